// TLS, mutual TLS and bearer tokens against the real server, with certificates the test makes.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "tests/e2e/helpers.h"
#include "tests/e2e/server_process.h"

namespace kvcompact::testing {
namespace {

namespace fs = std::filesystem;

constexpr char kToken[] = "token-one-0123456789abcdef";
constexpr char kRotatedToken[] = "token-two-fedcba9876543210";

// A CA with a server certificate (localhost, 127.0.0.1) and a client certificate, plus a second,
// unrelated CA with its own client certificate, made by the openssl command line.
class Pki {
 public:
  Pki() {
    char tmpl[] = "/tmp/kvcompact-pki-XXXXXX";
    dir_ = mkdtemp(tmpl);
    ok_ = MakeCa("ca") && MakeCa("other-ca") && MakeLeaf("server", "ca", "DNS:localhost,IP:127.0.0.1") &&
          MakeLeaf("client", "ca", "DNS:kvcompact-client") && MakeLeaf("stranger", "other-ca", "DNS:stranger") &&
          MakeLeaf("intruder", "ca", "DNS:intruder");
    std::ofstream(Path("tokens")) << "# accepted bearer tokens\n" << kToken << "\n\n" << kRotatedToken << "\n";
  }
  ~Pki() { fs::remove_all(dir_); }
  bool ok() const { return ok_; }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string log() const { return log_; }

 private:
  bool Run(std::vector<std::string> argv) {
    argv.insert(argv.begin(), "/usr/bin/openssl");
    std::string out;
    const int code = RunCommand(argv, &out);
    log_ += out;
    return code == 0;
  }
  bool MakeCa(const std::string& name) {
    return Run({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
                "-subj", "/CN=" + name, "-keyout", Path(name + ".key"), "-out", Path(name + ".pem")});
  }
  bool MakeLeaf(const std::string& name, const std::string& ca, const std::string& san) {
    std::ofstream(Path(name + ".ext")) << "subjectAltName=" << san << "\n";
    return Run({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=" + name,
                "-keyout", Path(name + ".key"), "-out", Path(name + ".csr")}) &&
           Run({"x509", "-req", "-in", Path(name + ".csr"), "-CA", Path(ca + ".pem"), "-CAkey", Path(ca + ".key"),
                "-CAcreateserial", "-days", "1", "-extfile", Path(name + ".ext"), "-out", Path(name + ".pem")});
  }

  std::string dir_, log_;
  bool ok_ = false;
};

client::ClientOptions Secured(const Pki& pki, const std::string& token, const std::string& identity = "") {
  client::ClientOptions options;
  options.security.root_certs_pem = ReadTextFile(pki.Path("ca.pem"));
  options.security.token = token;
  if (!identity.empty()) {
    options.security.cert_chain_pem = ReadTextFile(pki.Path(identity + ".pem"));
    options.security.private_key_pem = ReadTextFile(pki.Path(identity + ".key"));
  }
  return options;
}

absl::StatusCode CompactCode(const std::string& address, const client::ClientOptions& options) {
  auto outcome = client::Client(address, options).Compact(Header(1, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 4),
                                                          ToInputs(MakeLayers(1, 2, 128, 64)));
  if (outcome.ok() && outcome->layers.size() != 1) return absl::StatusCode::kInternal;
  return outcome.status().code();
}

class Security : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { pki_ = new Pki(); }
  static void TearDownTestSuite() { delete pki_; }
  static Pki* pki_;
};
Pki* Security::pki_ = nullptr;

TEST_F(Security, TlsAndTokensGuardTheServiceButNotHealth) {
  ASSERT_TRUE(pki_->ok()) << pki_->log();
  ServerProcess server({"--tls_cert_file=" + pki_->Path("server.pem"), "--tls_key_file=" + pki_->Path("server.key"),
                        "--auth_token_file=" + pki_->Path("tokens")});
  ASSERT_TRUE(server.ok()) << server.Log();

  // Plaintext to a TLS port does not connect at all.
  EXPECT_EQ(client::Client(server.address()).GetServerInfo(5).status().code(), absl::StatusCode::kUnavailable);
  // TLS without a token, with a wrong one, and with a token in the wrong scheme: UNAUTHENTICATED on
  // unary calls and on streams.
  for (const std::string& token : {std::string(), std::string("not-the-token-0123456789")}) {
    auto info = client::Client(server.address(), Secured(*pki_, token)).GetServerInfo(5);
    EXPECT_EQ(info.status().code(), absl::StatusCode::kUnauthenticated) << info.status();
    EXPECT_EQ(CompactCode(server.address(), Secured(*pki_, token)), absl::StatusCode::kUnauthenticated);
  }
  // Both tokens of the file are accepted (rotation); dialing by name works as well as by IP.
  EXPECT_EQ(CompactCode(server.address(), Secured(*pki_, kToken)), absl::StatusCode::kOk);
  EXPECT_EQ(CompactCode("localhost:" + server.address().substr(server.address().rfind(':') + 1),
                        Secured(*pki_, kRotatedToken)),
            absl::StatusCode::kOk);
  auto self_test = client::Client(server.address(), Secured(*pki_, kToken)).SelfTest(v1::SelfTestRequest(), 60);
  EXPECT_TRUE(self_test.ok()) << self_test.status();

  // Health answers without a token: on the TLS port and on the plaintext health-only port.
  auto serving = client::Client(server.address(), Secured(*pki_, "")).IsServing("", 5);
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);
  serving = client::Client(server.health_address()).IsServing("kvcompact.v1.KVCompact", 5);
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);

  // Refusals are counted by code; no token (accepted or presented) reaches the log.
  EXPECT_EQ(MetricValue(server.metrics_port(), R"(kvcompact_errors_total{code="UNAUTHENTICATED"})"), 4);
  const std::string log = server.Log();
  EXPECT_NE(log.find("bearer tokens required (2 accepted)"), std::string::npos) << log;
  EXPECT_NE(log.find("unauthenticated call from"), std::string::npos);
  for (const char* secret : {kToken, kRotatedToken, "not-the-token-0123456789"}) {
    EXPECT_EQ(log.find(secret), std::string::npos) << "secret in the log: " << secret;
  }
}

TEST_F(Security, MutualTlsNeedsAClientCertificateFromTheConfiguredCa) {
  ASSERT_TRUE(pki_->ok()) << pki_->log();
  ServerProcess server({"--tls_cert_file=" + pki_->Path("server.pem"), "--tls_key_file=" + pki_->Path("server.key"),
                        "--tls_client_ca_file=" + pki_->Path("ca.pem")});
  ASSERT_TRUE(server.ok()) << server.Log();
  EXPECT_NE(server.Log().find("transport mutual TLS; no token required"), std::string::npos) << server.Log();
  EXPECT_EQ(CompactCode(server.address(), Secured(*pki_, "")), absl::StatusCode::kUnavailable);
  EXPECT_EQ(CompactCode(server.address(), Secured(*pki_, "", "stranger")), absl::StatusCode::kUnavailable);
  EXPECT_EQ(CompactCode(server.address(), Secured(*pki_, "", "client")), absl::StatusCode::kOk);
  auto serving = client::Client(server.health_address()).IsServing("", 5);
  EXPECT_TRUE(serving.ok() && *serving);
}

TEST_F(Security, MutualTlsAllowListAdmitsOnlyTheNamedClientIdentities) {
  ASSERT_TRUE(pki_->ok()) << pki_->log();
  ServerProcess server({"--tls_cert_file=" + pki_->Path("server.pem"), "--tls_key_file=" + pki_->Path("server.key"),
                        "--tls_client_ca_file=" + pki_->Path("ca.pem"),
                        "--tls_client_allowed_names=kvcompact-client, other-name"});
  ASSERT_TRUE(server.ok()) << server.Log();
  EXPECT_NE(server.Log().find("mutual TLS (clients: kvcompact-client, other-name)"), std::string::npos) << server.Log();
  EXPECT_EQ(CompactCode(server.address(), Secured(*pki_, "", "client")), absl::StatusCode::kOk);
  // Signed by the same CA, but not a listed identity.
  EXPECT_EQ(CompactCode(server.address(), Secured(*pki_, "", "intruder")), absl::StatusCode::kPermissionDenied);
  auto info = client::Client(server.address(), Secured(*pki_, "", "intruder")).GetServerInfo();
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(info.status().message().find("intruder"), std::string::npos) << info.status();
  EXPECT_EQ(CompactCode(server.address(), Secured(*pki_, "", "stranger")), absl::StatusCode::kUnavailable);
  auto serving = client::Client(server.health_address()).IsServing("", 5);
  EXPECT_TRUE(serving.ok() && *serving);
  // The list without mutual TLS is a configuration error.
  ServerProcess bad({"--tls_client_allowed_names=kvcompact-client"});
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.Log().find("needs mutual TLS"), std::string::npos) << bad.Log();
}

TEST_F(Security, TokenFromTheEnvironmentOverPlaintext) {
  setenv("KVCOMPACT_AUTH_TOKEN", kToken, 1);
  ServerProcess server;
  unsetenv("KVCOMPACT_AUTH_TOKEN");
  ASSERT_TRUE(server.ok()) << server.Log();
  client::ClientOptions with_token;
  with_token.security.token = kToken;
  EXPECT_EQ(CompactCode(server.address(), with_token), absl::StatusCode::kOk);
  EXPECT_EQ(CompactCode(server.address(), {}), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(server.Log().find(kToken), std::string::npos);
}

TEST_F(Security, CliConnectsWithCaCertificateAndTokenFile) {
  ASSERT_TRUE(pki_->ok()) << pki_->log();
  ServerProcess server({"--tls_cert_file=" + pki_->Path("server.pem"), "--tls_key_file=" + pki_->Path("server.key"),
                        "--tls_client_ca_file=" + pki_->Path("ca.pem"), "--auth_token_file=" + pki_->Path("tokens")});
  ASSERT_TRUE(server.ok()) << server.Log();
  const std::vector<std::string> base = {CliBinary(), "info", "--server=" + server.address(), "--timeout=10",
                                         "--tls_ca=" + pki_->Path("ca.pem"), "--tls_cert=" + pki_->Path("client.pem"),
                                         "--tls_key=" + pki_->Path("client.key")};
  std::string out;
  EXPECT_EQ(RunCommand(base, &out), 1) << out;
  EXPECT_NE(out.find("UNAUTHENTICATED"), std::string::npos) << out;
  std::vector<std::string> with_token = base;
  with_token.push_back("--token_file=" + pki_->Path("tokens"));  // first token line
  EXPECT_EQ(RunCommand(with_token, &out), 0) << out;
  EXPECT_NE(out.find("version"), std::string::npos) << out;
}

TEST_F(Security, BadSecurityConfigurationStopsStartUpWithAReason) {
  ASSERT_TRUE(pki_->ok()) << pki_->log();
  const std::string short_token = pki_->Path("short-token");
  std::ofstream(short_token) << "short\n";
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--tls_cert_file=" + pki_->Path("server.pem")}, "needs both tls_cert_file and tls_key_file"},
      {{"--tls_client_ca_file=" + pki_->Path("ca.pem")}, "tls_client_ca_file needs"},
      {{"--tls_cert_file=" + pki_->Path("missing.pem"), "--tls_key_file=" + pki_->Path("server.key")}, "cannot read certificate"},
      {{"--tls_cert_file=" + pki_->Path("server.ext"), "--tls_key_file=" + pki_->Path("server.key")}, "holds no PEM block"},
      {{"--auth_token_file=" + short_token}, "at least 16 characters"},
      {{"--auth_token_file=" + pki_->Path("missing-tokens")}, "cannot read auth_token_file"},
  };
  for (const auto& [flags, reason] : cases) {
    std::vector<std::string> argv = {ServerBinary(), "--listen=127.0.0.1:0", "--metrics_listen=", "--warmup=false"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    std::string log;
    EXPECT_EQ(RunCommand(argv, &log), 2) << log;
    EXPECT_NE(log.find(reason), std::string::npos) << log;
  }
}

}  // namespace
}  // namespace kvcompact::testing
