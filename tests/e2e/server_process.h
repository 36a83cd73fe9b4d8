// Starts the real kvcompact-server binary on loopback for end-to-end tests: ephemeral ports read
// back from its log, ready once grpc.health.v1 on the health-only port says SERVING.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace kvcompact::testing {

class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> extra_args = {});
  ~ServerProcess();  // SIGKILL if still running

  bool ok() const { return pid_ > 0 && port_ > 0; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  int metrics_port() const { return metrics_port_; }
  // The plaintext health-only port (--health_listen), which the readiness wait uses.
  std::string health_address() const { return "127.0.0.1:" + std::to_string(health_port_); }
  pid_t pid() const { return pid_; }
  std::string Log() const;

  void Signal(int sig);
  // Waits for exit; returns the exit code (128 + signal when killed), -1 on timeout.
  int WaitForExit(double timeout_seconds);

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  int metrics_port_ = 0;
  int health_port_ = 0;
  std::string log_path_;
};

// Runs a command (argv[0] is the binary path); returns exit code and captures stdout+stderr.
int RunCommand(const std::vector<std::string>& argv, std::string* output);

// A TCP connection to 127.0.0.1:port (the caller closes it), or -1.
int ConnectLoopback(int port);
// Plain HTTP GET on loopback (for the /metrics endpoint).
std::string HttpGet(int port, const std::string& path);
// The value of one series (e.g. `kvcompact_errors_total{code="OK"}`) on the server's /metrics at
// `port`, or -1 when it is absent.
double MetricValue(int port, const std::string& series);
// A whole file as text ("" when it cannot be read).
std::string ReadTextFile(const std::string& path);

// Binary paths, from the build.
std::string ServerBinary();
std::string CliBinary();

}  // namespace kvcompact::testing
