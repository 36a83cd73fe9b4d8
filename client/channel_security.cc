#include "client/channel_security.h"

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"

namespace kvcompact::client {
namespace {

absl::StatusOr<std::string> ReadAll(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(std::string("cannot read ") + what + " " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<ChannelSecurity> LoadChannelSecurity(const std::string& ca_file, const std::string& cert_file,
                                                    const std::string& key_file, const std::string& token_file) {
  ChannelSecurity security;
  if (cert_file.empty() != key_file.empty()) {
    return absl::InvalidArgumentError("a client certificate needs both the certificate and the key file");
  }
  if (!cert_file.empty() && ca_file.empty()) {
    return absl::InvalidArgumentError("a client certificate needs TLS: name the server's CA too");
  }
  for (auto [path, field, what] : {std::tuple{&ca_file, &security.root_certs_pem, "CA file"},
                                   std::tuple{&cert_file, &security.cert_chain_pem, "certificate file"},
                                   std::tuple{&key_file, &security.private_key_pem, "key file"}}) {
    if (path->empty()) continue;
    auto text = ReadAll(*path, what);
    if (!text.ok()) return text.status();
    *field = *std::move(text);
  }
  if (!token_file.empty()) {
    auto text = ReadAll(token_file, "token file");
    if (!text.ok()) return text.status();
    for (absl::string_view line : absl::StrSplit(*text, absl::ByAnyChar("\r\n"))) {
      line = absl::StripAsciiWhitespace(line);
      if (!line.empty() && line[0] != '#') {
        security.token = std::string(line);
        break;
      }
    }
    if (security.token.empty()) return absl::InvalidArgumentError("token file " + token_file + " holds no token");
  }
  return security;
}

std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(const ChannelSecurity& security) {
  if (!security.tls()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = security.root_certs_pem;
  options.pem_cert_chain = security.cert_chain_pem;
  options.pem_private_key = security.private_key_pem;
  std::shared_ptr<grpc::ChannelCredentials> tls = grpc::SslCredentials(options);
  if (security.token.empty()) return tls;
  return grpc::CompositeChannelCredentials(tls, grpc::AccessTokenCredentials(security.token));
}

void AddPlaintextToken(const ChannelSecurity& security, grpc::ClientContext* context) {
  if (!security.tls() && !security.token.empty()) context->AddMetadata("authorization", "Bearer " + security.token);
}

}  // namespace kvcompact::client
