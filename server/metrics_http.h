// A minimal HTTP/1.0 endpoint serving GET /metrics in the Prometheus text format from a registry,
// to up to kMaxConnections clients at once, each within kConnectionDeadline from accept.
// Own thread with a default stack: the civetweb-based prometheus::Exposer cannot start its
// threads once the CUDA math libraries are linked (their static TLS exceeds civetweb's fixed
// thread stack size), and a scrape endpoint needs nothing more than this.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <prometheus/registry.h>

#include "absl/status/statusor.h"

namespace kvcompact::server {

class MetricsHttpServer {
 public:
  // `address` is host:port (port 0 picks a free one); binds and listens before returning.
  // `before_scrape` (optional) runs before each collection, to refresh sampled gauges.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& address,
                                                                  std::shared_ptr<prometheus::Registry> registry,
                                                                  std::function<void()> before_scrape = {});
  ~MetricsHttpServer();
  int port() const { return port_; }

 private:
  MetricsHttpServer(int fd, int port, std::shared_ptr<prometheus::Registry> registry, std::function<void()> before_scrape);
  static constexpr size_t kMaxConnections = 64;
  static constexpr std::chrono::seconds kConnectionDeadline{5};
  void Loop();
  std::string Respond(const std::string& request);

  int fd_;
  int port_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::function<void()> before_scrape_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace kvcompact::server
