#include "server/stream_watchdog.h"

namespace kvcompact::server {

StreamWatchdog::StreamWatchdog(std::chrono::milliseconds period) : period_(period), thread_([this] { Loop(); }) {}

StreamWatchdog::~StreamWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void StreamWatchdog::Add(Tick tick) {
  std::lock_guard<std::mutex> lock(mu_);
  ticks_.push_back(std::move(tick));
}

size_t StreamWatchdog::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ticks_.size() + ticking_;
}

void StreamWatchdog::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, period_, [this] { return stopping_; })) {
    // Ticks run without mu_ (they take their stream's lock, and a stream may Add meanwhile).
    std::vector<Tick> current;
    current.swap(ticks_);
    ticking_ = current.size();  // still registered while they run: size() counts them
    lock.unlock();
    const Clock::time_point now = Clock::now();
    std::vector<Tick> alive;
    alive.reserve(current.size());
    for (Tick& tick : current) {
      if (tick(now)) alive.push_back(std::move(tick));
    }
    current.clear();  // a tick's captures are released outside mu_
    lock.lock();
    for (Tick& tick : ticks_) alive.push_back(std::move(tick));
    ticks_.swap(alive);
    ticking_ = 0;
  }
}

}  // namespace kvcompact::server
