// How a client reaches a secured kvcompact-server: TLS (server verified against a CA), a client
// certificate for mutual TLS, and a bearer token sent on every call.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"

namespace kvcompact::client {

struct ChannelSecurity {
  std::string root_certs_pem;   // set: TLS, the server's certificate is verified against these
  std::string cert_chain_pem;   // with private_key_pem: client certificate (mutual TLS)
  std::string private_key_pem;
  std::string server_name;      // TLS name to verify instead of the target's host (e.g. dialing an IP)
  std::string token;            // bearer token; empty: none

  bool tls() const { return !root_certs_pem.empty(); }
};

// Reads PEM files and the first token line of `token_file` (any path may be empty).
absl::StatusOr<ChannelSecurity> LoadChannelSecurity(const std::string& ca_file, const std::string& cert_file,
                                                    const std::string& key_file, const std::string& token_file);

// Channel credentials: TLS with the token as call credentials, or plaintext.
std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(const ChannelSecurity& security);

// Call credentials need TLS; over plaintext (e.g. inside a service mesh) the token goes as metadata.
void AddPlaintextToken(const ChannelSecurity& security, grpc::ClientContext* context);

}  // namespace kvcompact::client
