#include "core/thread_pool.h"

#include <atomic>

namespace kvcompact {

ThreadPool::ThreadPool(int threads) {
  if (threads < 1) threads = 1;
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { Loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::Loop() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
      if (stop_ && tasks_.empty()) return;
      task = std::move(tasks_.front());
      tasks_.pop();
    }
    task();
  }
}

void ThreadPool::Submit(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push(std::move(task));
  }
  cv_.notify_one();
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  std::mutex done_mu;
  std::condition_variable done_cv;
  int64_t finished = 0;
  const int64_t runners = std::min<int64_t>(n, size());
  auto run = [&] {
    for (int64_t i = next++; i < n; i = next++) fn(i);
    std::lock_guard<std::mutex> lock(done_mu);
    if (++finished == runners) done_cv.notify_one();
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int64_t r = 0; r < runners; ++r) tasks_.push(run);
  }
  cv_.notify_all();
  std::unique_lock<std::mutex> lock(done_mu);
  done_cv.wait(lock, [&] { return finished == runners; });
}

}  // namespace kvcompact
