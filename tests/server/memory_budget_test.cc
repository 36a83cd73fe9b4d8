// Host-memory admission: reservations add up, refuse beyond the bound, and give back on release.
#include "server/memory_budget.h"

#include <gtest/gtest.h>

namespace kvcompact::server {
namespace {

TEST(MemoryBudget, ReservesUpToTheLimitAndReleasesOnDestruction) {
  uint64_t last_seen = 0;
  MemoryBudget budget(1000, [&](uint64_t bytes) { last_seen = bytes; });
  auto a = budget.Reserve(600, "a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(last_seen, 600u);
  auto b = budget.Reserve(500, "layer 3 (4096 tokens)");
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(b.status().message().find("layer 3 (4096 tokens)"), std::string::npos) << b.status();
  EXPECT_NE(b.status().message().find("Retry later"), std::string::npos) << "transient, not too large";
  {
    auto c = budget.Reserve(400, "c");
    ASSERT_TRUE(c.ok());
    EXPECT_EQ(budget.in_use(), 1000u);
  }
  EXPECT_EQ(budget.in_use(), 600u);
  auto too_big = budget.Reserve(1001, "huge");
  ASSERT_FALSE(too_big.ok());
  EXPECT_NE(too_big.status().message().find("Send fewer tokens"), std::string::npos) << too_big.status();
  a->Release();
  EXPECT_EQ(budget.in_use(), 0u);
  EXPECT_EQ(last_seen, 0u);
}

TEST(MemoryBudget, MergeAndMoveKeepOneAccount) {
  MemoryBudget budget(100);
  MemoryReservation held;
  held.Merge(*budget.Reserve(30, "kv"));
  held.Merge(*budget.Reserve(20, "queries"));
  EXPECT_EQ(held.bytes(), 50u);
  MemoryReservation moved = std::move(held);
  EXPECT_EQ(budget.in_use(), 50u);
  moved = MemoryReservation();
  EXPECT_EQ(budget.in_use(), 0u);
}

TEST(MemoryEstimate, CoversTheFp32BuffersAndGrowsWithQueries) {
  // 8 heads x 4096 tokens x (128 + 128) fp32 is 32 MiB of K and V alone.
  EXPECT_GE(LayerKeyValueBytes(8, 4096, 128, 128), uint64_t{8} * 4096 * 256 * 4);
  EXPECT_GT(LayerQueryBytes(8, 4096, 2048, 128, 128, 4), LayerQueryBytes(8, 4096, 1024, 128, 128, 4));
  EXPECT_GT(LayerQueryBytes(8, 4096, 2048, 128, 128, 8), LayerQueryBytes(8, 4096, 2048, 128, 128, 1));
}

}  // namespace
}  // namespace kvcompact::server
