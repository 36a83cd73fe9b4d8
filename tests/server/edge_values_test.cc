// The edges of every client-supplied number the stream plan and admission take: 0, 1, equal,
// just over, 2^31, 2^32, 2^63, 2^64 - 1, tiny and denormal ratios; and the timers and the log
// limiter that bound what a client can make the server hold.
#include <atomic>
#include <cmath>
#include <limits>
#include <thread>

#include <gtest/gtest.h>

#include "server/limits.h"
#include "server/log_limiter.h"
#include "server/memory_budget.h"
#include "server/stream_plan.h"
#include "server/stream_watchdog.h"

namespace kvcompact::server {
namespace {

v1::StreamHeader Header() {
  v1::StreamHeader h;
  h.mutable_geometry()->set_num_layers(2);
  h.mutable_geometry()->set_num_kv_heads(2);
  h.mutable_geometry()->set_head_dim(64);
  h.mutable_options()->mutable_budget()->set_ratio(8);
  return h;
}

TEST(StreamPlanEdges, RatiosFromDenormalToHugeGiveBudgetsWithinOneAndT) {
  struct Case { double ratio; int64_t tokens; int64_t want; };
  const double denormal = std::numeric_limits<double>::denorm_min();
  for (const Case& c : std::vector<Case>{{denormal, 4096, 4096}, {1e-300, 4096, 4096}, {0.5, 4096, 4096},
                                         {1, 4096, 4096}, {1 + 1e-12, 4096, 4096}, {2, 4096, 2048},
                                         {4096, 4096, 1}, {8192, 4096, 1}, {1e300, 4096, 1},
                                         {std::numeric_limits<double>::max(), 1, 1}, {3, 1, 1}}) {
    v1::StreamHeader h = Header();
    h.mutable_options()->mutable_budget()->set_ratio(c.ratio);
    absl::StatusOr<StreamPlan> plan = MakeStreamPlan(h);
    ASSERT_TRUE(plan.ok()) << c.ratio << ": " << plan.status();
    absl::StatusOr<std::vector<int64_t>> t = plan->LayerBudgets(0, c.tokens);
    ASSERT_TRUE(t.ok());
    EXPECT_EQ((*t)[0], c.want) << "ratio " << c.ratio << " T " << c.tokens;
  }
  for (double bad : {0.0, -0.0, -1.0, std::numeric_limits<double>::infinity(), std::nan("")}) {
    v1::StreamHeader h = Header();
    h.mutable_options()->mutable_budget()->set_ratio(bad);
    EXPECT_FALSE(MakeStreamPlan(h).ok()) << bad;
  }
}

TEST(StreamPlanEdges, SinkTokensAtAndPastInt32) {
  for (uint32_t sinks : {0u, 1u, 4u, 0x7fffffffu}) {
    v1::StreamHeader h = Header();
    h.mutable_options()->set_sink_tokens(sinks);
    absl::StatusOr<StreamPlan> plan = MakeStreamPlan(h);
    ASSERT_TRUE(plan.ok()) << sinks;
    EXPECT_GE(plan->options.sink_tokens, 0);
  }
  for (uint32_t sinks : {0x80000000u, 0x80000001u, 0xffffffffu}) {
    v1::StreamHeader h = Header();
    h.mutable_options()->set_sink_tokens(sinks);
    absl::StatusOr<StreamPlan> plan = MakeStreamPlan(h);
    ASSERT_FALSE(plan.ok()) << sinks;
    EXPECT_NE(plan.status().message().find("sink_tokens"), std::string::npos);
  }
}

TEST(StreamPlanEdges, RequestIdsAreBoundedAndPrintable) {
  for (const std::string& ok : {std::string(), std::string("req-1 / layer=3"), std::string(kMaxRequestIdBytes, '~')}) {
    v1::StreamHeader h = Header();
    h.set_request_id(ok);
    EXPECT_TRUE(MakeStreamPlan(h).ok()) << ok;
  }
  for (const std::string& bad : {std::string(kMaxRequestIdBytes + 1, 'a'), std::string("a\nb"), std::string("\r"),
                                 std::string("x\x7f"), std::string("\xc3\xa9"), std::string(1, '\0')}) {
    v1::StreamHeader h = Header();
    h.set_request_id(bad);
    EXPECT_FALSE(MakeStreamPlan(h).ok());
  }
}

TEST(StreamPlanEdges, GeometryAtItsBounds) {
  struct Case { uint32_t layers, heads, d; bool ok; };
  for (const Case& c : std::vector<Case>{{1, 1, 1, true}, {4096, 1024, 1024, true}, {0, 1, 64, false},
                                         {4097, 1, 64, false}, {1, 1025, 64, false}, {1, 1, 1025, false},
                                         {0xffffffffu, 0xffffffffu, 0xffffffffu, false}}) {
    v1::StreamHeader h = Header();
    h.mutable_geometry()->set_num_layers(c.layers);
    h.mutable_geometry()->set_num_kv_heads(c.heads);
    h.mutable_geometry()->set_head_dim(c.d);
    EXPECT_EQ(MakeStreamPlan(h).ok(), c.ok) << c.layers << " " << c.heads << " " << c.d;
  }
}

TEST(AdmissionAccounting, MethodWorkingMemoryGrowsWithThePoolAndSaturates) {
  LayerJob job;
  job.data = LayerData{0, 1, 4096, 256, 64, 64, 0.125f, {}, {}, {}, {}};
  job.budgets = {512};
  job.options.method = Method::kAmHighestAttention;
  EXPECT_EQ(LayerMethodBytes(job, {}, 0, 1), 0u) << "highest attention needs nothing beyond the layer estimate";
  job.options.method = Method::kAmOmp;
  job.options.omp_pool = 1024;
  const uint64_t small = LayerMethodBytes(job, {}, 0, 1);
  job.options.omp_pool = int64_t{1} << 40;  // every key
  const uint64_t all = LayerMethodBytes(job, {}, 0, 1);
  EXPECT_GE(small, 12ull * 1024 * 1024);
  EXPECT_GE(all, 12ull * 4096 * 4096);
  EXPECT_EQ(LayerMethodBytes(job, {}, 0, 2), LayerMethodBytes(job, {}, 0, 1)) << "one head: one pool at a time";
  job.data.tokens = int64_t{1} << 31;
  job.budgets = {int64_t{1} << 30};
  EXPECT_EQ(LayerMethodBytes(job, {}, 0, 64), UINT64_MAX) << "saturates instead of wrapping";
  LayerAllocation sensitivity;
  sensitivity.kind = LayerAllocation::Kind::kSensitivity;
  job.options.method = Method::kAmHighestAttention;
  job.data.tokens = 4096;
  EXPECT_GE(LayerMethodBytes(job, sensitivity, 0, 1), 4096u * 129 * 4) << "the probe's copy of K/V";
}

TEST(AdmissionAccounting, AccountedBytesCountAndReleaseInParts) {
  MemoryBudget budget(1000);
  MemoryReservation held = budget.Account(1500);  // already held: counted even over the bound
  EXPECT_EQ(budget.in_use(), 1500u);
  EXPECT_FALSE(budget.Reserve(1, "x").ok());
  held.ReleasePart(600);
  EXPECT_EQ(budget.in_use(), 900u);
  EXPECT_TRUE(budget.Reserve(100, "x").ok());
  held.ReleasePart(5000);  // at most what is held
  EXPECT_EQ(budget.in_use(), 0u);
  EXPECT_EQ(held.bytes(), 0u);
}

TEST(LogLimiter, PassesAFewLinesASecondAndCountsTheRest) {
  LogLimiter limiter(3);
  uint64_t suppressed = 0;
  int passed = 0;
  for (int i = 0; i < 100; ++i) passed += limiter.Allow(&suppressed);
  EXPECT_EQ(passed, 3);
  std::this_thread::sleep_for(std::chrono::milliseconds(1050));
  ASSERT_TRUE(limiter.Allow(&suppressed));
  EXPECT_EQ(suppressed, 97u);
}

TEST(StreamWatchdog, TicksRegisteredStreamsUntilTheyAreGone) {
  StreamWatchdog watchdog(std::chrono::milliseconds(10));
  std::atomic<int> ticks{0};
  watchdog.Add([&](StreamWatchdog::Clock::time_point) { return ++ticks < 3; });
  for (int i = 0; i < 200 && watchdog.size() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(ticks.load(), 3);
  EXPECT_EQ(watchdog.size(), 0u);
}

}  // namespace
}  // namespace kvcompact::server
