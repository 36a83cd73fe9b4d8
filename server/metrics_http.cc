#include "server/metrics_http.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

#include <prometheus/text_serializer.h>

#include "absl/strings/str_cat.h"

namespace kvcompact::server {

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, std::shared_ptr<prometheus::Registry> registry, std::function<void()> before_scrape) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return absl::InvalidArgumentError(absl::StrCat("metrics address '", address, "' is not host:port"));
  std::string host = address.substr(0, colon);
  const std::string port = address.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (int e = getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res); e != 0) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address '", address, "': ", gai_strerror(e)));
  }
  int fd = -1;
  std::string error = "no usable address";
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 16) == 0) break;
    error = std::strerror(errno);
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("cannot listen on ", address, ": ", error));
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  const int bound_port = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                                     : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  return std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer(fd, bound_port, std::move(registry), std::move(before_scrape)));
}

MetricsHttpServer::MetricsHttpServer(int fd, int port, std::shared_ptr<prometheus::Registry> registry,
                                     std::function<void()> before_scrape)
    : fd_(fd), port_(port), registry_(std::move(registry)), before_scrape_(std::move(before_scrape)),
      thread_([this] { Loop(); }) {}

MetricsHttpServer::~MetricsHttpServer() {
  stop_ = true;
  thread_.join();
  close(fd_);
}

void MetricsHttpServer::Loop() {
  // One thread, non-blocking sockets, poll(): a connection that drips bytes or does not read its
  // response holds only its own slot, until its deadline, never the endpoint.
  struct Connection {
    int fd;
    std::chrono::steady_clock::time_point deadline;
    std::string in, out;
    size_t sent = 0;
  };
  std::vector<Connection> open;
  while (!stop_) {
    std::vector<pollfd> fds = {{fd_, POLLIN, 0}};
    for (const Connection& c : open) fds.push_back({c.fd, static_cast<short>(c.out.empty() ? POLLIN : POLLOUT), 0});
    poll(fds.data(), fds.size(), 100);  // wake up regularly to notice stop_ and deadlines
    const auto now = std::chrono::steady_clock::now();
    for (size_t i = 0; i < open.size(); ++i) {
      Connection& c = open[i];
      const short events = fds[i + 1].revents;
      bool done = now > c.deadline || (events & (POLLERR | POLLNVAL));
      if (!done && c.out.empty() && (events & (POLLIN | POLLHUP))) {
        char buf[1024];
        const ssize_t n = recv(c.fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) c.in.append(buf, static_cast<size_t>(n));
        const bool complete = c.in.find("\r\n\r\n") != std::string::npos || c.in.find("\n\n") != std::string::npos ||
                              c.in.size() >= 8192;
        if (complete || n == 0) c.out = Respond(c.in);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) done = true;
      } else if (!done && !c.out.empty() && (events & POLLOUT)) {
        const ssize_t n = send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) c.sent += static_cast<size_t>(n);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) done = true;
        if (c.sent == c.out.size()) done = true;
      }
      if (done) {
        close(c.fd);
        c.fd = -1;
      }
    }
    open.erase(std::remove_if(open.begin(), open.end(), [](const Connection& c) { return c.fd < 0; }), open.end());
    if (fds[0].revents & POLLIN) {
      const int client = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (client < 0) continue;
      if (open.size() >= kMaxConnections) {
        close(client);  // over the bound: refused at once, the others go on
        continue;
      }
      open.push_back({client, now + kConnectionDeadline, {}, {}, 0});
    }
  }
  for (const Connection& c : open) close(c.fd);
}

std::string MetricsHttpServer::Respond(const std::string& request) {
  const bool metrics = request.rfind("GET /metrics ", 0) == 0 || request.rfind("GET /metrics?", 0) == 0;
  std::string body, status = "200 OK", type = "text/plain; version=0.0.4; charset=utf-8";
  if (metrics) {
    if (before_scrape_) before_scrape_();
    body = prometheus::TextSerializer().Serialize(registry_->Collect());
  } else {
    status = "404 Not Found";
    body = "only GET /metrics is served here\n";
    type = "text/plain";
  }
  return absl::StrCat("HTTP/1.0 ", status, "\r\nContent-Type: ", type, "\r\nContent-Length: ", body.size(),
                      "\r\nConnection: close\r\n\r\n", body);
}

}  // namespace kvcompact::server
