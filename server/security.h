// Transport security and caller authentication of the service: TLS / mutual TLS server
// credentials from PEM files, and bearer tokens checked on every kvcompact.v1 call. The health
// service is never behind the token, so probes work without secrets.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"

namespace kvcompact::server {

struct TlsFiles {
  std::string cert;       // server certificate chain (PEM); empty: plaintext
  std::string key;        // its private key (PEM)
  std::string client_ca;  // set: mutual TLS, clients must present a certificate signed by this CA
};

// Plaintext when no certificate is named; a key without a certificate (or the reverse) is an error.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& files);

// True when a and b are equal; the time taken depends only on b's length (b: what the caller sent).
bool ConstantTimeEquals(const std::string& a, const std::string& b);

class TokenAuthenticator {
 public:
  TokenAuthenticator() = default;  // disabled: every call passes
  // Tokens, one per line (several allow rotation without downtime); blank lines and '#' comments
  // are skipped. The file wins over `env_tokens` (the same format, from KVCOMPACT_AUTH_TOKEN).
  static absl::StatusOr<TokenAuthenticator> Load(const std::string& token_file, const std::string& env_tokens);

  bool enabled() const { return !tokens_.empty(); }
  size_t token_count() const { return tokens_.size(); }
  // OK, or UNAUTHENTICATED with a reason that never contains what the caller sent.
  grpc::Status Check(const grpc::ServerContextBase& context) const;

 private:
  std::vector<std::string> tokens_;
};

// Client identities allowed under mutual TLS: a client certificate passes when one of its subject
// alternative names or its common name is in the list. Empty list: any certificate the client CA
// signed (the TLS handshake already checked that).
class ClientIdentityFilter {
 public:
  ClientIdentityFilter() = default;
  explicit ClientIdentityFilter(std::vector<std::string> names) : names_(std::move(names)) {}
  bool enabled() const { return !names_.empty(); }
  // OK, or PERMISSION_DENIED naming the identities the certificate carried.
  grpc::Status Check(const grpc::ServerContextBase& context) const;

 private:
  std::vector<std::string> names_;
};

}  // namespace kvcompact::server
