// Rate limit for log lines a client can cause (refused calls, bad layers): at most `per_second`
// lines a second pass; the rest are counted and the next line that passes says how many were
// suppressed. A flood of bad calls then costs a few lines a second, not one line per call.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>

namespace kvcompact::server {

class LogLimiter {
 public:
  explicit LogLimiter(int per_second = 10) : per_second_(per_second) {}
  // True when this line may be written; `suppressed` gets the lines dropped since the last one.
  bool Allow(uint64_t* suppressed) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = std::chrono::steady_clock::now();
    if (now - window_start_ >= std::chrono::seconds(1)) {
      window_start_ = now;
      in_window_ = 0;
    }
    if (in_window_ >= per_second_) {
      ++suppressed_;
      return false;
    }
    ++in_window_;
    *suppressed = suppressed_;
    suppressed_ = 0;
    return true;
  }

 private:
  const int per_second_;
  std::mutex mu_;
  std::chrono::steady_clock::time_point window_start_{};
  int in_window_ = 0;
  uint64_t suppressed_ = 0;
};

}  // namespace kvcompact::server
