// The worker: bounded queue with wake-ups, cancellation, the unhealthy-backend path, and several
// lanes (layers in flight) taking from one queue.
#include "server/worker.h"

#include <algorithm>
#include <atomic>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace kvcompact::server {
namespace {

// Blocks each CompactLayer until released; can turn unhealthy after a number of layers.
class FakeBackend final : public Backend {
 public:
  std::string_view name() const override { return "fake"; }
  absl::StatusOr<LayerResult> CompactLayer(const LayerJob& job) override {
    std::unique_lock<std::mutex> lock(mu);
    log.push_back("compact " + std::to_string(job.data.layer));
    ++entered;
    cv.wait(lock, [&] { return released > 0; });
    --released;
    ++calls;
    if (fail_after >= 0 && calls > fail_after) {
      healthy_ = false;
      return absl::DataLossError("sticky device error (fake)");
    }
    return LayerResult{};
  }
  bool healthy() const override { return healthy_; }
  void Prefetch(std::shared_ptr<const LayerJob> next) override {
    std::lock_guard<std::mutex> lock(mu);
    log.push_back("prefetch " + std::to_string(next->data.layer));
    held = std::move(next);  // as the CUDA backend's stager does while it uploads
  }
  void Release(int n) {
    std::lock_guard<std::mutex> lock(mu);
    released += n;
    cv.notify_all();
  }
  std::mutex mu;
  std::condition_variable cv;
  int released = 0, calls = 0, fail_after = -1;
  std::atomic<int> entered{0};
  std::atomic<bool> healthy_{true};
  std::vector<std::string> log;
  std::shared_ptr<const LayerJob> held;
};

struct Counter {
  std::atomic<int> ran{0}, dropped{0};
  // A layer task numbered `layer`; counts whether the pipeline ran it or the worker dropped it.
  WorkItem Item(std::function<bool()> cancelled = {}, int32_t layer = -1) {
    WorkItem item;
    item.cancelled = std::move(cancelled);
    LayerTask task;
    task.job = std::make_shared<LayerJob>();
    task.job->data.layer = layer;
    task.done = [this](LayerOutcome outcome, double, double) {
      if (absl::IsCancelled(outcome.result.status())) {
        ++dropped;
      } else {
        ++ran;
      }
    };
    item.layer = std::move(task);
    return item;
  }
};

// `n` fake backends for a worker's lanes; `fakes` points at them.
std::vector<std::unique_ptr<Backend>> Fakes(int n, std::vector<FakeBackend*>* fakes) {
  std::vector<std::unique_ptr<Backend>> backends;
  for (int i = 0; i < n; ++i) {
    backends.push_back(std::make_unique<FakeBackend>());
    fakes->push_back(static_cast<FakeBackend*>(backends.back().get()));
  }
  return backends;
}

Metrics& TestMetrics() {
  static Metrics metrics("test", "fake");
  return metrics;
}

TEST(Worker, FullQueueRegistersAWakeUpThatFires) {
  auto backend = std::make_unique<FakeBackend>();
  FakeBackend* fake = backend.get();
  Worker worker(std::move(backend), 1, &TestMetrics());
  Counter c;
  std::promise<void> woke;
  WorkItem a = c.Item(), b = c.Item(), d = c.Item();
  ASSERT_TRUE(worker.SubmitOrWait(a, [] {}));
  while (fake->entered.load() == 0) std::this_thread::yield();  // `a` is running, blocked in the backend
  ASSERT_TRUE(worker.SubmitOrWait(b, [] {}));                   // fills the one queue slot
  EXPECT_FALSE(worker.SubmitOrWait(d, [&] { woke.set_value(); }));  // queue full: d waits
  fake->Release(1);
  EXPECT_EQ(woke.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  fake->Release(10);
  worker.Stop();
  EXPECT_EQ(c.ran.load(), 2);
}

TEST(Worker, NextQueuedLayerIsHandedToPrefetchBeforeTheCurrentRuns) {
  auto backend = std::make_unique<FakeBackend>();
  FakeBackend* fake = backend.get();
  Worker worker(std::move(backend), 4, &TestMetrics());
  Counter c;
  WorkItem blocker = c.Item(), a = c.Item({}, 1), b = c.Item({}, 2), d = c.Item({}, 3);
  ASSERT_TRUE(worker.SubmitOrWait(blocker, [] {}));
  while (fake->entered.load() == 0) std::this_thread::yield();  // the queue fills behind it
  ASSERT_TRUE(worker.SubmitOrWait(a, [] {}));
  ASSERT_TRUE(worker.SubmitOrWait(b, [] {}));
  ASSERT_TRUE(worker.SubmitOrWait(d, [] {}));
  fake->Release(10);
  // Stop() would drop what is still queued: wait until the worker has run everything.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (c.ran.load() < 4 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  worker.Stop();
  EXPECT_EQ(c.ran.load(), 4);
  const std::vector<std::string> want = {"compact -1", "prefetch 2", "compact 1", "prefetch 3", "compact 2", "compact 3"};
  EXPECT_EQ(fake->log, want);
}

// A compacted layer's buffers go to the pool for the next layer, except while a prefetch still
// holds the job (its upload may be reading them).
TEST(Worker, CompactedLayersGiveTheirBuffersBackUnlessAPrefetchHoldsThem) {
  auto backend = std::make_unique<FakeBackend>();
  FakeBackend* fake = backend.get();
  Worker worker(std::move(backend), 4, &TestMetrics());
  HostBufferPool pool(size_t{1} << 30);
  Counter c;
  std::vector<WorkItem> items;
  for (int32_t layer : {0, 1, 2}) {
    items.push_back(c.Item({}, layer));
    items.back().layer->job->data.keys.resize(1000 << layer);
    items.back().layer->buffers = &pool;
  }
  ASSERT_TRUE(worker.SubmitOrWait(items[0], [] {}));
  while (fake->entered.load() == 0) std::this_thread::yield();
  ASSERT_TRUE(worker.SubmitOrWait(items[1], [] {}));  // when it starts, layer 2 is prefetched and held
  ASSERT_TRUE(worker.SubmitOrWait(items[2], [] {}));
  fake->Release(10);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (c.ran.load() < 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  worker.Stop();
  ASSERT_EQ(c.ran.load(), 3);
  ASSERT_TRUE(fake->held && fake->held->data.layer == 2);
  EXPECT_EQ(fake->held->data.keys.size(), 4000u);             // not taken from under the prefetch
  EXPECT_EQ(pool.idle_bytes(), (1000 + 2000) * sizeof(float));  // layers 0 and 1
}

TEST(Worker, CancelledItemsAreDroppedNotRun) {
  auto backend = std::make_unique<FakeBackend>();
  backend->Release(10);
  Worker worker(std::move(backend), 4, &TestMetrics());
  Counter c;
  WorkItem item = c.Item([] { return true; });
  ASSERT_TRUE(worker.SubmitOrWait(item, [] {}));
  worker.Stop();
  EXPECT_EQ(c.ran.load(), 0);
  EXPECT_EQ(c.dropped.load(), 1);
}

TEST(Worker, UnhealthyBackendFiresCallbackOnceAndDropsLaterWork) {
  auto backend = std::make_unique<FakeBackend>();
  backend->fail_after = 1;
  backend->Release(10);
  std::atomic<int> fired{0};
  Worker worker(std::move(backend), 8, &TestMetrics(), [&] { ++fired; });
  Counter c;
  for (int i = 0; i < 4; ++i) {
    WorkItem item = c.Item();
    ASSERT_TRUE(worker.SubmitOrWait(item, [] {}));
  }
  while (c.ran.load() + c.dropped.load() < 4) std::this_thread::yield();
  worker.Stop();
  EXPECT_EQ(fired.load(), 1);
  EXPECT_EQ(c.ran.load(), 2);      // the good layer and the one that failed
  EXPECT_EQ(c.dropped.load(), 2);  // the rest never reach the backend
}

TEST(Worker, OtherWorkRunsOnTheBackendThreadAndIsDroppedOnStop) {
  auto backend = std::make_unique<FakeBackend>();
  FakeBackend* fake = backend.get();
  Worker worker(std::move(backend), 4, &TestMetrics());
  Backend* seen = nullptr;
  worker.RunBlocking([&](Backend* b) { seen = b; });
  EXPECT_EQ(seen, fake);
  Counter c;
  WorkItem blocker = c.Item();
  ASSERT_TRUE(worker.SubmitOrWait(blocker, [] {}));
  while (fake->entered.load() == 0) std::this_thread::yield();
  std::atomic<int> dropped{0};
  WorkItem other;
  other.run = [&](Backend* b, double) { dropped += b == nullptr; };
  ASSERT_TRUE(worker.SubmitOrWait(other, [] {}));
  std::thread stop([&] { worker.Stop(); });  // drops `other` while the blocker still runs
  while (dropped.load() == 0) std::this_thread::yield();
  fake->Release(1);
  stop.join();
  EXPECT_EQ(dropped.load(), 1);
  EXPECT_EQ(c.ran.load(), 1);
}

TEST(Worker, LanesRunLayersAtOnceAndPinnedWorkRunsOnItsLane) {
  std::vector<FakeBackend*> fakes;
  Worker worker(Fakes(3, &fakes), 8, &TestMetrics());
  ASSERT_EQ(worker.lanes(), 3);
  for (int lane : {2, 0, 1}) {  // warm-up style: each lane's own backend, whatever the order
    Backend* seen = nullptr;
    worker.RunBlocking([&](Backend* b) { seen = b; }, lane);
    EXPECT_EQ(seen, fakes[lane]) << "lane " << lane;
  }
  Counter c;
  std::vector<WorkItem> items;
  for (int32_t layer = 0; layer < 5; ++layer) items.push_back(c.Item({}, layer));
  for (WorkItem& item : items) ASSERT_TRUE(worker.SubmitOrWait(item, [] {}));
  // Three layers are inside the backends at once, one per lane; none has finished.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  auto inside = [&] { return fakes[0]->entered.load() + fakes[1]->entered.load() + fakes[2]->entered.load(); };
  while (inside() < 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  EXPECT_EQ(inside(), 3);
  for (FakeBackend* f : fakes) EXPECT_EQ(f->entered.load(), 1);
  EXPECT_EQ(c.ran.load(), 0);
  for (FakeBackend* f : fakes) f->Release(10);
  while (c.ran.load() < 5 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  worker.Stop();
  EXPECT_EQ(c.ran.load(), 5);
  // Each layer ran once, and a layer a lane claimed (prefetched) ran on that lane's backend after.
  int compacted = 0;
  for (FakeBackend* f : fakes) {
    for (size_t i = 0; i < f->log.size(); ++i) {
      if (f->log[i].rfind("compact ", 0) == 0 && f->log[i] != "compact -1") ++compacted;
      if (f->log[i].rfind("prefetch ", 0) != 0) continue;
      const std::string want = "compact " + f->log[i].substr(9);
      EXPECT_NE(std::find(f->log.begin() + i, f->log.end(), want), f->log.end()) << f->log[i];
    }
  }
  EXPECT_EQ(compacted, 5);
}

// A lane that starts a layer with another queued behind it (and no idle lane to take it) claims
// that one and uploads it; a stop before it runs drops it, like the queued ones.
TEST(Worker, ClaimedLayerIsPrefetchedAndDroppedOnStop) {
  std::vector<FakeBackend*> fakes;
  Worker worker(Fakes(1, &fakes), 8, &TestMetrics());
  FakeBackend* fake = fakes[0];
  Counter c;
  std::vector<WorkItem> items;
  for (int32_t layer = 0; layer < 4; ++layer) items.push_back(c.Item({}, layer));
  ASSERT_TRUE(worker.SubmitOrWait(items[0], [] {}));
  while (fake->entered.load() < 1) std::this_thread::yield();
  for (int k = 1; k < 4; ++k) ASSERT_TRUE(worker.SubmitOrWait(items[k], [] {}));
  fake->Release(1);  // layer 0 ends; layer 1 starts and layer 2 is claimed behind it
  while (fake->entered.load() < 2) std::this_thread::yield();
  std::thread stop([&] { worker.Stop(); });
  while (c.dropped.load() < 1) std::this_thread::yield();  // layer 3, still queued, is dropped: stopping
  fake->Release(10);
  stop.join();
  EXPECT_EQ(c.ran.load(), 2);      // layers 0 and 1
  EXPECT_EQ(c.dropped.load(), 2);  // layer 3 (queued) and layer 2 (claimed)
  const std::vector<std::string> want = {"compact 0", "prefetch 2", "compact 1"};
  EXPECT_EQ(fake->log, want);
}

TEST(Worker, OneUnhealthyLaneStopsEveryLane) {
  std::vector<FakeBackend*> fakes;
  std::vector<std::unique_ptr<Backend>> backends = Fakes(2, &fakes);
  for (FakeBackend* fake : fakes) {
    fake->fail_after = 0;  // every call fails with a sticky error
    fake->Release(10);
  }
  std::atomic<int> fired{0};
  Worker worker(std::move(backends), 8, &TestMetrics(), [&] { ++fired; });
  Counter c;
  WorkItem first = c.Item();
  ASSERT_TRUE(worker.SubmitOrWait(first, [] {}));
  while (fired.load() == 0) std::this_thread::yield();  // the failing lane has marked the worker unhealthy
  for (int i = 0; i < 4; ++i) {
    WorkItem item = c.Item();
    ASSERT_TRUE(worker.SubmitOrWait(item, [] {}));
  }
  while (c.ran.load() + c.dropped.load() < 5) std::this_thread::yield();
  worker.Stop();
  EXPECT_EQ(fired.load(), 1);
  EXPECT_EQ(c.ran.load(), 1);      // the layer that failed
  EXPECT_EQ(c.dropped.load(), 4);  // the rest reach neither backend
}

}  // namespace
}  // namespace kvcompact::server
