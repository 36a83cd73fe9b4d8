// The worker: bounded queue with wake-ups, cancellation, and the unhealthy-backend path.
#include "server/worker.h"

#include <atomic>
#include <future>
#include <thread>

#include <gtest/gtest.h>

namespace kvcompact::server {
namespace {

// Blocks each CompactLayer until released; can turn unhealthy after a number of layers.
class FakeBackend final : public Backend {
 public:
  std::string_view name() const override { return "fake"; }
  absl::StatusOr<LayerResult> CompactLayer(const LayerJob&) override {
    std::unique_lock<std::mutex> lock(mu);
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
};

struct Counter {
  std::atomic<int> ran{0}, dropped{0};
  WorkItem Item(std::function<bool()> cancelled = {}) {
    WorkItem item;
    item.cancelled = std::move(cancelled);
    item.run = [this](Backend* b, double) {
      if (!b) {
        ++dropped;
        return;
      }
      LayerJob job;
      (void)b->CompactLayer(job);
      ++ran;
    };
    return item;
  }
};

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

}  // namespace
}  // namespace kvcompact::server
