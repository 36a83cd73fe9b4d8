#include "server/worker.h"

#include <algorithm>

namespace kvcompact::server {

namespace {

std::vector<std::unique_ptr<Backend>> One(std::unique_ptr<Backend> backend) {
  std::vector<std::unique_ptr<Backend>> v;
  v.push_back(std::move(backend));
  return v;
}

}  // namespace

Worker::Worker(std::unique_ptr<Backend> backend, size_t capacity, Metrics* metrics,
               std::function<void()> on_unhealthy)
    : Worker(One(std::move(backend)), capacity, metrics, std::move(on_unhealthy)) {}

Worker::Worker(std::vector<std::unique_ptr<Backend>> backends, size_t capacity, Metrics* metrics,
               std::function<void()> on_unhealthy)
    : capacity_(capacity), metrics_(metrics), on_unhealthy_(std::move(on_unhealthy)) {
  for (auto& backend : backends) {
    auto lane = std::make_unique<Lane>();
    lane->index = static_cast<int>(lanes_.size());
    lane->backend = std::move(backend);
    lanes_.push_back(std::move(lane));
  }
  for (auto& lane : lanes_) lane->thread = std::thread([this, l = lane.get()] { Loop(*l); });
}

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
  cv_.notify_all();  // an item for one lane must not wake only another
  return true;
}

void Worker::RunBlocking(std::function<void(Backend*)> run, int lane) {
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
  item.lane = lane;
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
  for (auto& lane : lanes_) {
    if (lane->thread.joinable()) lane->thread.join();
  }
}

void Worker::Loop(Lane& lane) {
  // The layer this lane runs next, taken from the queue and handed to its backend's Prefetch while
  // the current one computes (the next layer's upload overlaps this one's work).
  std::optional<WorkItem> claimed;
  for (;;) {
    WorkItem item;
    std::vector<std::function<void()>> wake;
    std::shared_ptr<const LayerJob> next;
    {
      std::unique_lock<std::mutex> lock(mu_);
      auto mine = [&](bool layers_only) {
        return std::find_if(queue_.begin(), queue_.end(), [&](const WorkItem& w) {
          return (w.lane < 0 || w.lane == lane.index) && (!layers_only || w.layer);
        });
      };
      auto take_waiter = [&] {
        if (space_waiters_.empty()) return;
        wake.push_back(std::move(space_waiters_.front()));
        space_waiters_.pop_front();
      };
      if (claimed && !stopping_) {
        item = std::move(*claimed);
        claimed.reset();
      } else {
        if (claimed) {  // stopping: a claimed layer is dropped like the queued ones
          lock.unlock();
          Run(*claimed, nullptr, 0);
          return;
        }
        ++idle_lanes_;
        cv_.wait(lock, [&] { return stopping_ || mine(false) != queue_.end(); });
        --idle_lanes_;
        const auto it = mine(false);
        if (it == queue_.end()) return;  // stopping
        item = std::move(*it);
        queue_.erase(it);
        take_waiter();
      }
      // Claim the next layer only when it is surplus: every idle lane still has an item to take.
      if (item.layer && !unhealthy_ && queue_.size() > idle_lanes_) {
        const auto it = mine(true);
        if (it != queue_.end()) {
          claimed = std::move(*it);
          queue_.erase(it);
          next = claimed->layer->job;
          take_waiter();
        }
      }
      metrics_->queue_depth.Set(static_cast<double>(queue_.size()));
    }
    for (auto& w : wake) w();
    Backend& backend = *lane.backend;
    const auto start = std::chrono::steady_clock::now();
    const double queued = std::chrono::duration<double>(start - item.submitted).count();
    const bool dropped = unhealthy_ || (item.cancelled && item.cancelled());
    if (next) backend.Prefetch(std::move(next));
    Run(item, dropped ? nullptr : &backend, queued);
    metrics_->gpu_memory_reserved.Set(static_cast<double>(backend.device_bytes_reserved()));
    metrics_->gpu_memory_peak.Set(static_cast<double>(backend.device_bytes_peak()));
    if (!backend.healthy() && !unhealthy_.exchange(true) && on_unhealthy_) on_unhealthy_();
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
