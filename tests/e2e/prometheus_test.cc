// A real Prometheus (the Debian package) scrapes the real server on loopback; after a compaction
// its HTTP API must return the documented series, and the shipped alerting rules must load.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "tests/e2e/helpers.h"
#include "tests/e2e/server_process.h"

namespace kvcompact::testing {
namespace {

namespace fs = std::filesystem;
constexpr char kPrometheus[] = "/usr/bin/prometheus";

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

std::string UrlEncode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (isalnum(c) || c == '_' || c == '-' || c == '.') {
      out += static_cast<char>(c);
    } else {
      char buf[4];
      snprintf(buf, sizeof(buf), "%%%02X", c);
      out += buf;
    }
  }
  return out;
}

// The JSON body of an HTTP response, or null.
nlohmann::json JsonBody(const std::string& response) {
  const size_t body = response.find("\r\n\r\n");
  if (body == std::string::npos) return nullptr;
  return nlohmann::json::parse(response.substr(body + 4), nullptr, false);
}

class PrometheusProcess {
 public:
  PrometheusProcess(int target_port, const std::string& rules) : port_(FreePort()) {
    char tmpl[] = "/tmp/kvcompact-prom-XXXXXX";
    dir_ = mkdtemp(tmpl);
    std::ofstream(dir_ + "/prometheus.yml")
        << "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        << "rule_files: ['" << rules << "']\n"
        << "scrape_configs:\n  - job_name: kvcompact\n    static_configs: [{targets: ['127.0.0.1:" << target_port << "']}]\n";
    pid_ = fork();
    if (pid_ == 0) {
      const std::string log = dir_ + "/prometheus.log";
      freopen(log.c_str(), "w", stdout);
      freopen(log.c_str(), "a", stderr);
      execl(kPrometheus, kPrometheus, ("--config.file=" + dir_ + "/prometheus.yml").c_str(),
            ("--storage.tsdb.path=" + dir_ + "/data").c_str(),
            ("--web.listen-address=127.0.0.1:" + std::to_string(port_)).c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
  }
  ~PrometheusProcess() {
    kill(pid_, SIGTERM);
    waitpid(pid_, nullptr, 0);
    fs::remove_all(dir_);
  }
  bool WaitReady(double seconds) const {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int>(seconds * 1000));
    while (std::chrono::steady_clock::now() < deadline) {
      if (HttpGet(port_, "/-/ready").find(" 200 ") != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return false;
  }
  nlohmann::json Api(const std::string& path) const { return JsonBody(HttpGet(port_, path)); }
  nlohmann::json Query(const std::string& promql) const { return Api("/api/v1/query?query=" + UrlEncode(promql)); }
  std::string Log() const { return ReadTextFile(dir_ + "/prometheus.log"); }

 private:
  int port_;
  pid_t pid_ = -1;
  std::string dir_;
};

// Metric families named in docs/operations.md's metrics table (`kvcompact_...` / `process_...`).
std::set<std::string> DocumentedFamilies() {
  const std::string text = ReadTextFile(std::string(KVCOMPACT_SOURCE_DIR) + "/docs/operations.md");
  std::set<std::string> out;
  const std::regex row(R"(\n\| `((kvcompact|process)_[a-z_]+)`)");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), row); it != std::sregex_iterator(); ++it) {
    out.insert((*it)[1]);
  }
  return out;
}

std::string Family(const std::string& series) {
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    const std::string s(suffix);
    if (series.size() > s.size() && series.compare(series.size() - s.size(), s.size(), s) == 0 &&
        series.rfind("process_", 0) != 0) {
      return series.substr(0, series.size() - s.size());
    }
  }
  return series;
}

TEST(Prometheus, ScrapesEveryDocumentedSeriesAfterACompaction) {
  if (access(kPrometheus, X_OK) != 0) GTEST_SKIP() << "no " << kPrometheus << " (scripts/install-deps.sh installs it)";
  ServerProcess server;
  ASSERT_TRUE(server.ok()) << server.Log();
  PrometheusProcess prometheus(server.metrics_port(), std::string(KVCOMPACT_SOURCE_DIR) + "/deploy/prometheus/rules.yaml");
  ASSERT_TRUE(prometheus.WaitReady(60)) << prometheus.Log();

  auto outcome = client::Client(server.address()).Compact(Header(2, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 8),
                                                          ToInputs(MakeLayers(2, 2, 512, 256)));
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  // A refused call, so that an error series exists too.
  auto bad = client::Client(server.address()).Compact(Header(1, 2, 64, v1::METHOD_H2O, 8), ToInputs(MakeLayers(1, 2, 512, 0)));
  ASSERT_TRUE(bad.ok());
  ASSERT_EQ(bad->errors.size(), 1u);

  // Wait until a scrape after the compaction has landed.
  double layers_ok = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline && layers_ok < 2) {
    nlohmann::json r = prometheus.Query(R"(kvcompact_layers_total{job="kvcompact",result="ok"})");
    if (r.is_object() && r["status"] == "success" && !r["data"]["result"].empty()) {
      layers_ok = std::stod(r["data"]["result"][0]["value"][1].get<std::string>());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  ASSERT_EQ(layers_ok, 2) << prometheus.Log();

  nlohmann::json up = prometheus.Query(R"(up{job="kvcompact"})");
  ASSERT_EQ(up["data"]["result"].size(), 1u);
  EXPECT_EQ(up["data"]["result"][0]["value"][1], "1");
  nlohmann::json errors = prometheus.Query(R"(kvcompact_errors_total{code="INVALID_ARGUMENT"})");
  ASSERT_EQ(errors["data"]["result"].size(), 1u) << errors.dump();
  EXPECT_EQ(errors["data"]["result"][0]["value"][1], "1");
  nlohmann::json stages = prometheus.Query(R"(count by (stage) (kvcompact_stage_seconds_bucket))");
  std::set<std::string> stage_names;
  for (const auto& s : stages["data"]["result"]) stage_names.insert(s["metric"]["stage"].get<std::string>());
  EXPECT_EQ(stage_names, (std::set<std::string>{"decode", "queue", "score", "mass_fit", "value_fit", "evaluate"}));
  nlohmann::json quantile = prometheus.Query("histogram_quantile(0.5, sum by (le) (kvcompact_layer_tokens_bucket))");
  ASSERT_EQ(quantile["data"]["result"].size(), 1u);
  EXPECT_GT(std::stod(quantile["data"]["result"][0]["value"][1].get<std::string>()), 256);

  // Every family the server exports is documented, and every documented one is exported.
  nlohmann::json names = prometheus.Api("/api/v1/label/__name__/values");
  std::set<std::string> scraped;
  for (const auto& n : names["data"]) {
    const std::string name = n.get<std::string>();
    if (name.rfind("kvcompact_", 0) == 0 || name.rfind("process_", 0) == 0) scraped.insert(Family(name));
  }
  const std::set<std::string> documented = DocumentedFamilies();
  EXPECT_EQ(scraped, documented);

  // The shipped alerting rules loaded and evaluate without errors.
  nlohmann::json rules = prometheus.Api("/api/v1/rules");
  ASSERT_EQ(rules["data"]["groups"].size(), 1u) << rules.dump();
  for (const auto& rule : rules["data"]["groups"][0]["rules"]) {
    EXPECT_NE(rule["health"], "err") << rule.dump();
  }
  EXPECT_GE(rules["data"]["groups"][0]["rules"].size(), 8u);
}

}  // namespace
}  // namespace kvcompact::testing
