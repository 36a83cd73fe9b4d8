#include "server/worker.h"

namespace kvcompact::server {

Worker::Worker(std::unique_ptr<Backend> backend, size_t capacity, Metrics* metrics,
               std::function<void()> on_unhealthy)
    : backend_(std::move(backend)), capacity_(capacity), metrics_(metrics), on_unhealthy_(std::move(on_unhealthy)),
      thread_([this] { Loop(); }) {}

Worker::~Worker() { Stop(); }

bool Worker::SubmitOrWait(WorkItem& item, std::function<void()> on_space) {
  std::lock_guard<std::mutex> lock(mu_);
  // Stop() runs after the gRPC server has shut down, so no stream is left to submit then.
  if (stopping_) return false;
  if (queue_.size() >= capacity_) {
    space_waiters_.push_back(std::move(on_space));
    return false;
  }
  item.submitted = std::chrono::steady_clock::now();
  queue_.push_back(std::move(item));
  metrics_->queue_depth.Set(static_cast<double>(queue_.size()));
  cv_.notify_one();
  return true;
}

void Worker::RunBlocking(std::function<void(Backend*)> run) {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  WorkItem item;
  item.run = [&](Backend* backend, double) {
    run(backend);
    std::lock_guard<std::mutex> lock(mu);
    done = true;
    cv.notify_one();
  };
  while (!SubmitOrWait(item, [&] { cv.notify_one(); })) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait_for(lock, std::chrono::milliseconds(50));
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
}

void Worker::Stop() {
  std::deque<WorkItem> dropped;
  std::deque<std::function<void()>> waiters;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    dropped.swap(queue_);
    waiters.swap(space_waiters_);
    cv_.notify_all();
  }
  for (WorkItem& item : dropped) Run(item, nullptr, 0);
  for (auto& w : waiters) w();
  if (thread_.joinable()) thread_.join();
}

void Worker::Loop() {
  for (;;) {
    WorkItem item;
    std::function<void()> waiter;
    std::shared_ptr<const LayerJob> next;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping
      item = std::move(queue_.front());
      queue_.pop_front();
      if (!queue_.empty() && queue_.front().layer) next = queue_.front().layer->job;
      metrics_->queue_depth.Set(static_cast<double>(queue_.size()));
      if (!space_waiters_.empty()) {
        waiter = std::move(space_waiters_.front());
        space_waiters_.pop_front();
      }
    }
    if (waiter) waiter();
    const auto start = std::chrono::steady_clock::now();
    const double queued = std::chrono::duration<double>(start - item.submitted).count();
    const bool dropped = unhealthy_ || (item.cancelled && item.cancelled());
    if (next && !unhealthy_) backend_->Prefetch(std::move(next));  // overlaps the next upload with this layer
    Run(item, dropped ? nullptr : backend_.get(), queued);
    metrics_->gpu_memory_reserved.Set(static_cast<double>(backend_->device_bytes_reserved()));
    metrics_->gpu_memory_peak.Set(static_cast<double>(backend_->device_bytes_peak()));
    if (!unhealthy_ && !backend_->healthy()) {
      unhealthy_ = true;
      if (on_unhealthy_) on_unhealthy_();
    }
  }
}

void Worker::Run(WorkItem& item, Backend* backend, double queue_seconds) {
  if (!item.layer) {
    item.run(backend, queue_seconds);
    return;
  }
  LayerTask task = std::move(*item.layer);
  item.layer.reset();
  const auto start = std::chrono::steady_clock::now();
  LayerOutcome outcome;
  outcome.result = absl::CancelledError("stream cancelled or server shutting down");
  if (backend) outcome = RunLayer(*backend, task.job.get(), task.plan);
  // Free the layer's inputs before its owner encodes the outputs: into the pool for the next
  // layer when nothing else holds the job (a backend's prefetch may still read a job it holds).
  if (task.buffers != nullptr && task.job.use_count() == 1) task.buffers->GiveLayer(task.job->data);
  task.job.reset();
  task.done(std::move(outcome), queue_seconds,
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
}

}  // namespace kvcompact::server
