#include "tests/e2e/server_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include "client/client.h"

namespace kvcompact::testing {

// The build's binaries, unless the environment names others (running the suite elsewhere).
std::string ServerBinary() {
  const char* env = std::getenv("KVCOMPACT_TEST_SERVER_BINARY");
  return env ? env : KVCOMPACT_SERVER_BINARY;
}
std::string CliBinary() {
  const char* env = std::getenv("KVCOMPACT_TEST_CLI_BINARY");
  return env ? env : KVCOMPACT_CLI_BINARY;
}

namespace {

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log_path) {
  const pid_t pid = fork();
  if (pid != 0) return pid;
  const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  dup2(fd, 1);
  dup2(fd, 2);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  execv(args[0], args.data());
  _exit(127);
}

}  // namespace

std::string ReadTextFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ServerProcess::ServerProcess(std::vector<std::string> extra_args) {
  char tmpl[] = "/tmp/kvcompact-server-XXXXXX";
  const int fd = mkstemp(tmpl);
  close(fd);
  log_path_ = tmpl;
  std::vector<std::string> argv = {ServerBinary(), "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                                   "--health_listen=127.0.0.1:0", "--threads=2"};
  argv.insert(argv.end(), extra_args.begin(), extra_args.end());
  pid_ = Spawn(argv, log_path_);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  const std::regex grpc_port(R"(listening on \S+ \(port (\d+)\))"), metrics_port(R"(metrics on \S+ \(port (\d+)\))"),
      health_port(R"(health on \S+ \(port (\d+)\))");
  while (std::chrono::steady_clock::now() < deadline) {
    const std::string log = ReadTextFile(log_path_);
    std::smatch m;
    if (port_ == 0 && std::regex_search(log, m, grpc_port)) port_ = std::stoi(m[1]);
    if (metrics_port_ == 0 && std::regex_search(log, m, metrics_port)) metrics_port_ = std::stoi(m[1]);
    if (health_port_ == 0 && std::regex_search(log, m, health_port)) health_port_ = std::stoi(m[1]);
    if (port_ > 0 && health_port_ > 0) {
      auto serving = client::Client(health_address()).IsServing("", 1);
      if (serving.ok() && *serving) return;
    }
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {  // died during start-up
      pid_ = -1;
      port_ = 0;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  port_ = 0;
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  std::remove(log_path_.c_str());
}

std::string ServerProcess::Log() const { return ReadTextFile(log_path_); }

void ServerProcess::Signal(int sig) {
  if (pid_ > 0) kill(pid_, sig);
}

int ServerProcess::WaitForExit(double timeout_seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int>(timeout_seconds * 1000));
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

int RunCommand(const std::vector<std::string>& argv, std::string* output) {
  char tmpl[] = "/tmp/kvcompact-cmd-XXXXXX";
  const int fd = mkstemp(tmpl);
  close(fd);
  const pid_t pid = Spawn(argv, tmpl);
  int status = 0;
  waitpid(pid, &status, 0);
  if (output) *output = ReadTextFile(tmpl);
  std::remove(tmpl);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int ConnectLoopback(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

std::string HttpGet(int port, const std::string& path) {
  const int fd = ConnectLoopback(port);
  if (fd < 0) return "";
  const std::string request = "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  (void)!write(fd, request.data(), request.size());
  std::string response;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) response.append(buf, static_cast<size_t>(n));
  close(fd);
  return response;
}

double MetricValue(int port, const std::string& series) {
  const std::string text = HttpGet(port, "/metrics");
  const std::regex re("\n" + std::regex_replace(series, std::regex(R"([{}"])"), R"(\$&)") + R"( ([0-9.e+-]+))");
  std::smatch m;
  return std::regex_search(text, m, re) ? std::stod(m[1]) : -1;
}

}  // namespace kvcompact::testing
