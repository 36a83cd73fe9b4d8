// The one thread that owns the compute backend and runs the compaction pipeline on it. Streams
// post whole layers (typed tasks: job, plan, completion) into a bounded queue;
// when the queue is full they stop reading (so HTTP/2 flow control pushes back on the client) and
// register a callback that runs when a slot frees up.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

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
};

class Worker {
 public:
  // `on_unhealthy` runs once, on the worker thread, when the backend stops being healthy; the
  // worker then fails every further item with UNAVAILABLE.
  Worker(std::unique_ptr<Backend> backend, size_t capacity, Metrics* metrics,
         std::function<void()> on_unhealthy = {});
  ~Worker();  // stops and joins; queued items complete with CANCELLED

  std::string_view backend_name() const { return backend_->name(); }
  const Backend& backend() const { return *backend_; }

  // Queues the item and returns true, or, when the queue is full, leaves the item untouched,
  // registers `on_space` (run once, on the worker thread, when the next item leaves the queue)
  // and returns false. Atomic, so no wake-up is lost between the two.
  bool SubmitOrWait(WorkItem& item, std::function<void()> on_space);
  // Runs `run` on the worker thread and blocks until it has returned (start-up warm-up).
  void RunBlocking(std::function<void(Backend*)> run);
  // Stops taking work, fails queued items with CANCELLED, joins the thread.
  void Stop();

 private:
  void Loop();
  // Runs an item, or with backend == nullptr drops it; a layer task goes through core's RunLayer
  // and is reported to its owner.
  static void Run(WorkItem& item, Backend* backend, double queue_seconds);

  std::unique_ptr<Backend> backend_;
  const size_t capacity_;
  Metrics* metrics_;
  std::function<void()> on_unhealthy_;
  bool unhealthy_ = false;  // worker thread only
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<WorkItem> queue_;
  std::deque<std::function<void()>> space_waiters_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace kvcompact::server
