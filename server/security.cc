#include "server/security.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace kvcompact::server {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(std::string("cannot read ") + what + " file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  if (ss.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(std::string(what) + " file " + path + " holds no PEM block");
  }
  return ss.str();
}

std::vector<std::string> ParseTokens(const std::string& text) {
  std::vector<std::string> tokens;
  for (absl::string_view line : absl::StrSplit(text, absl::ByAnyChar("\r\n"))) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    tokens.emplace_back(line);
  }
  return tokens;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& files) {
  if (files.cert.empty() && files.key.empty()) {
    if (!files.client_ca.empty()) return absl::InvalidArgumentError("tls_client_ca_file needs tls_cert_file and tls_key_file");
    return grpc::InsecureServerCredentials();
  }
  if (files.cert.empty() || files.key.empty()) {
    return absl::InvalidArgumentError("TLS needs both tls_cert_file and tls_key_file");
  }
  grpc::SslServerCredentialsOptions options;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  auto cert = ReadPem(files.cert, "certificate");
  if (!cert.ok()) return cert.status();
  auto key = ReadPem(files.key, "private key");
  if (!key.ok()) return key.status();
  pair.cert_chain = *std::move(cert);
  pair.private_key = *std::move(key);
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!files.client_ca.empty()) {
    auto ca = ReadPem(files.client_ca, "client CA");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *std::move(ca);
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  if (a.empty()) return b.empty();
  unsigned diff = a.size() != b.size() ? 1u : 0u;
  for (size_t i = 0; i < b.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i % a.size()]) ^ static_cast<unsigned char>(b[i]);
  }
  return diff == 0;
}

absl::StatusOr<TokenAuthenticator> TokenAuthenticator::Load(const std::string& token_file,
                                                            const std::string& env_tokens) {
  TokenAuthenticator auth;
  if (!token_file.empty()) {
    std::ifstream in(token_file, std::ios::binary);
    if (!in) return absl::InvalidArgumentError("cannot read auth_token_file " + token_file);
    std::stringstream ss;
    ss << in.rdbuf();
    auth.tokens_ = ParseTokens(ss.str());
    if (auth.tokens_.empty()) return absl::InvalidArgumentError("auth_token_file " + token_file + " holds no token");
  } else {
    auth.tokens_ = ParseTokens(env_tokens);
  }
  for (const std::string& t : auth.tokens_) {
    if (t.size() < 16) return absl::InvalidArgumentError("bearer tokens must have at least 16 characters");
  }
  return auth;
}

grpc::Status TokenAuthenticator::Check(const grpc::ServerContextBase& context) const {
  if (tokens_.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata");
  }
  const std::string header(it->second.data(), it->second.size());
  constexpr absl::string_view kScheme = "bearer ";
  if (header.size() <= kScheme.size() || !absl::StartsWithIgnoreCase(header, kScheme)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "authorization metadata is not a bearer token");
  }
  const std::string presented = header.substr(kScheme.size());
  bool match = false;
  for (const std::string& token : tokens_) match |= ConstantTimeEquals(token, presented);  // no early exit
  if (!match) return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid bearer token");
  return grpc::Status::OK;
}

grpc::Status ClientIdentityFilter::Check(const grpc::ServerContextBase& context) const {
  if (names_.empty()) return grpc::Status::OK;
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  std::vector<std::string> seen;
  if (auth != nullptr) {
    for (const char* property : {"x509_subject_alternative_name", "x509_common_name"}) {
      for (const grpc::string_ref& value : auth->FindPropertyValues(property)) {
        const std::string identity(value.data(), value.size());
        if (std::find(names_.begin(), names_.end(), identity) != names_.end()) return grpc::Status::OK;
        seen.push_back(identity);
      }
    }
  }
  return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                      seen.empty() ? std::string("no client certificate identity; tls_client_allowed_names is set")
                                   : absl::StrCat("client certificate identity [", absl::StrJoin(seen, ", "),
                                                  "] is not in tls_client_allowed_names"));
}

}  // namespace kvcompact::server
