// A fixed pool of worker threads with a blocking ParallelFor; used to spread the heads of a layer
// over cores. Eigen itself runs single-threaded inside each task.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <queue>
#include <thread>
#include <vector>

namespace kvcompact {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()); }
  // Runs fn(i) for i in [0, n) and returns when all calls have returned.
  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn);
  // Queues `task` and returns at once; it runs on a pool thread (long-lived threads instead of a
  // thread per task: no per-thread set-up, e.g. of the CUDA runtime, on every call).
  void Submit(std::function<void()> task);

 private:
  void Loop();
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::queue<std::function<void()>> tasks_;
  bool stop_ = false;
};

}  // namespace kvcompact
