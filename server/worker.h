// The threads that own the compute backends and run the compaction pipeline on them: one lane
// (thread + backend) per layer in flight. Streams post whole layers (typed tasks: job, plan,
// completion) into one bounded queue that every lane takes from; a lane also claims the next layer
// when no idle lane is left to take it, and uploads it while it computes the current one. When the
// queue is full streams stop reading (so HTTP/2 flow control pushes back on the client) and
// register a callback that runs when a slot frees up. Several lanes on one GPU overlap one layer's latency-bound solver steps
// with another's attention statistics (docs/BENCHMARKS.md); a stream's layers may then finish out
// of order, which the protocol allows (each layer is answered as soon as it is done).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "core/layer.h"
#include "core/layer_task.h"
#include "server/host_buffers.h"
#include "server/metrics.h"

namespace kvcompact::server {

// A layer to compact: the worker runs the core's pipeline for it (RunLayer) on its backend.
struct LayerTask {
  std::shared_ptr<LayerJob> job;
  LayerPlan plan;
  HostBufferPool* buffers = nullptr;  // where the layer's input buffers go once it is compacted
  // Called on the worker thread once the layer's inputs are released: the outcome (CANCELLED
  // when the item was dropped: cancelled stream, shutdown, unhealthy backend), the seconds it
  // waited in the queue and the seconds it ran.
  std::function<void(LayerOutcome outcome, double queue_seconds, double run_seconds)> done;
};

struct WorkItem {
  std::function<bool()> cancelled;  // checked before running: cancelled streams are skipped
  std::optional<LayerTask> layer;   // a layer to compact, or else:
  // Other work on the backend's thread (self-test, warm-up), run with the backend, or with
  // nullptr when the item was dropped so that its owner can report that.
  std::function<void(Backend* backend, double queue_seconds)> run;
  std::chrono::steady_clock::time_point submitted;
  int lane = -1;  // >= 0: only that lane may run it (warm-up of every backend)
};

class Worker {
 public:
  // `on_unhealthy` runs once, on the worker thread, when the backend stops being healthy; the
  // worker then fails every further item with UNAVAILABLE.
  Worker(std::unique_ptr<Backend> backend, size_t capacity, Metrics* metrics,
         std::function<void()> on_unhealthy = {});
  // One lane per backend (at least one); the backends are of one kind and size.
  Worker(std::vector<std::unique_ptr<Backend>> backends, size_t capacity, Metrics* metrics,
         std::function<void()> on_unhealthy = {});
  ~Worker();  // stops and joins; queued items complete with CANCELLED

  std::string_view backend_name() const { return lanes_[0]->backend->name(); }
  // The first lane's backend (name, admission checks, device memory: the same for every lane).
  const Backend& backend() const { return *lanes_[0]->backend; }
  int lanes() const { return static_cast<int>(lanes_.size()); }

  // Queues the item and returns true, or, when the queue is full, leaves the item untouched,
  // registers `on_space` (run once, on the worker thread, when the next item leaves the queue)
  // and returns false. Atomic, so no wake-up is lost between the two.
  bool SubmitOrWait(WorkItem& item, std::function<void()> on_space);
  // Runs `run` on a worker thread (on lane `lane` when >= 0) and blocks until it has returned
  // (start-up warm-up).
  void RunBlocking(std::function<void(Backend*)> run, int lane = -1);
  // Stops taking work, fails queued items with CANCELLED, joins the thread.
  void Stop();

 private:
  struct Lane {
    int index = 0;
    std::unique_ptr<Backend> backend;
    std::thread thread;
  };
  void Loop(Lane& lane);
  // Runs an item, or with backend == nullptr drops it; a layer task goes through core's RunLayer
  // and is reported to its owner.
  static void Run(WorkItem& item, Backend* backend, double queue_seconds);

  std::vector<std::unique_ptr<Lane>> lanes_;
  const size_t capacity_;
  Metrics* metrics_;
  std::function<void()> on_unhealthy_;
  std::atomic<bool> unhealthy_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<WorkItem> queue_;
  std::deque<std::function<void()>> space_waiters_;
  bool stopping_ = false;
  size_t idle_lanes_ = 0;  // lanes waiting for work
};

}  // namespace kvcompact::server
