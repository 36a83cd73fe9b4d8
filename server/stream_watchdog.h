// One thread that ticks every registered stream a few times a second, so that timeouts (idle
// streams, stalled layers, responses nobody reads) are enforced without a timer per stream.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kvcompact::server {

class StreamWatchdog {
 public:
  using Clock = std::chrono::steady_clock;
  // Called from the watchdog thread; returns false once the stream is gone (then dropped).
  using Tick = std::function<bool(Clock::time_point now)>;

  explicit StreamWatchdog(std::chrono::milliseconds period = std::chrono::milliseconds(250));
  ~StreamWatchdog();
  StreamWatchdog(const StreamWatchdog&) = delete;
  StreamWatchdog& operator=(const StreamWatchdog&) = delete;

  void Add(Tick tick);
  size_t size() const;

 private:
  void Loop();

  const std::chrono::milliseconds period_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Tick> ticks_;
  size_t ticking_ = 0;  // ticks taken out of ticks_ for the pass in progress
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace kvcompact::server
