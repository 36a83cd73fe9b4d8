// Chunked compaction: budgets per chunk, indices into the whole block, and the composition of
// compacted chunks checked against the whole block.
#include "core/chunked.h"
#include "core/layer_task.h"

#include <algorithm>
#include <numeric>

#include <gtest/gtest.h>

#include "tests/core/synthetic_job.h"

namespace kvcompact {
namespace {

LayerJob SyntheticJob(int64_t heads, int64_t tokens, int64_t queries, int64_t budget, uint64_t seed) {
  LayerJob job = testing::SyntheticJob(heads, tokens, queries, budget, seed);
  job.options.holdout_fraction = 0.2;
  return job;
}

TEST(ChunkBounds, BalancedAndCovering) {
  EXPECT_EQ(ChunkBounds(10, 4), (std::vector<int64_t>{0, 3, 6, 10}));
  EXPECT_EQ(ChunkBounds(8, 8), (std::vector<int64_t>{0, 8}));
  EXPECT_EQ(ChunkBounds(8, 100), (std::vector<int64_t>{0, 8}));
}

TEST(CompactLayerInChunks, BudgetsSplitByLengthAndIndicesCoverEveryChunk) {
  const LayerJob job = SyntheticJob(2, 1000, 256, 50, 3);
  auto cpu = MakeCpuBackend(2);
  auto r = CompactLayerInChunks(*cpu, job, 300, LayerAllocation{});  // 4 chunks of 250
  ASSERT_TRUE(r.ok()) << r.status();
  for (const CompactedHead& h : r->heads) {
    ASSERT_EQ(h.indices.size(), 50u);
    EXPECT_TRUE(std::is_sorted(h.indices.begin(), h.indices.end()));
    EXPECT_EQ(h.keys.rows(), 50);
    EXPECT_EQ(h.beta.size(), 50);
    for (int c = 0; c < 4; ++c) {
      const auto in_chunk = std::count_if(h.indices.begin(), h.indices.end(),
                                          [&](int32_t i) { return i >= 250 * c && i < 250 * (c + 1); });
      EXPECT_EQ(in_chunk, c < 2 ? 13 : 12) << "chunk " << c;  // 12.5 each, largest remainder first
    }
  }
  // Keys are copies of the whole block's rows at the reported indices.
  const CompactedHead& h1 = r->heads[1];
  const BlockView block = job.data.HeadBlock(1);
  for (size_t r_i = 0; r_i < h1.indices.size(); ++r_i) EXPECT_EQ(h1.keys.row(r_i), block.keys.row(h1.indices[r_i]));
}

TEST(CompactLayerInChunks, UnchangedChunksReproduceTheWholeBlockExactly) {
  LayerJob job = SyntheticJob(1, 300, 64, 300, 4);
  job.data.bias.assign(300, 0.f);
  for (int i = 0; i < 300; ++i) job.data.bias[i] = 0.01f * (i % 7);
  auto cpu = MakeCpuBackend(1);
  auto r = CompactLayerInChunks(*cpu, job, 100, LayerAllocation{});
  ASSERT_TRUE(r.ok());
  const CompactedHead& h = r->heads[0];
  ASSERT_EQ(h.indices.size(), 300u);
  for (int i = 0; i < 300; ++i) EXPECT_EQ(h.indices[i], i);
  EXPECT_EQ(h.keys, MatrixF(job.data.HeadBlock(0).keys));
  EXPECT_EQ(h.values, MatrixF(job.data.HeadBlock(0).values));
  for (int i = 0; i < 300; ++i) EXPECT_EQ(h.beta[i], job.data.bias[i]);
  EXPECT_LT(h.quality.output_rel_error, 1e-5f);
  EXPECT_LT(h.quality.mass_rel_error, 1e-5f);
}

// The composition argument in numbers: chunks compacted with AM and concatenated stay close to
// the unchunked compaction on held-out queries of the whole block, and well ahead of H2O.
TEST(CompactLayerInChunks, ComposedErrorCloseToUnchunked) {
  const LayerJob job = SyntheticJob(3, 1200, 400, 60, 5);
  auto cpu = MakeCpuBackend(2);
  auto whole = cpu->CompactLayer(job);
  auto chunked = CompactLayerInChunks(*cpu, job, 400, LayerAllocation{});
  LayerJob h2o_job = job;
  h2o_job.options.method = Method::kH2O;
  auto h2o = cpu->CompactLayer(h2o_job);
  ASSERT_TRUE(whole.ok() && chunked.ok() && h2o.ok());
  double e_whole = 0, e_chunked = 0, e_h2o = 0;
  for (int h = 0; h < 3; ++h) {
    e_whole += whole->heads[h].quality.output_rel_error;
    e_chunked += chunked->heads[h].quality.output_rel_error;
    e_h2o += h2o->heads[h].quality.output_rel_error;
  }
  EXPECT_LT(e_chunked, 1.5 * e_whole) << "whole " << e_whole << " chunked " << e_chunked;
  EXPECT_LT(e_chunked, 0.8 * e_h2o) << "h2o " << e_h2o << " chunked " << e_chunked;
}

TEST(CompactLayerInChunks, BudgetSmallerThanTheChunkCountIsRefused) {
  const LayerJob job = SyntheticJob(1, 1000, 64, 3, 6);
  auto cpu = MakeCpuBackend(1);
  auto r = CompactLayerInChunks(*cpu, job, 100, LayerAllocation{});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("raise chunk_tokens"), std::string::npos);
}

TEST(CompactLayerInChunks, SensitivityRuleKeepsEachChunksTotal) {
  const LayerJob job = SyntheticJob(3, 900, 200, 45, 7);
  auto cpu = MakeCpuBackend(2);
  LayerAllocation rule;
  rule.kind = LayerAllocation::Kind::kSensitivity;
  rule.probe_queries = 100;
  auto r = CompactLayerInChunks(*cpu, job, 300, rule);
  ASSERT_TRUE(r.ok()) << r.status();
  int64_t total = 0;
  for (const CompactedHead& h : r->heads) total += static_cast<int64_t>(h.indices.size());
  EXPECT_EQ(total, 135);
}

// RunLayer, the one place the service composes a layer: chunked only past the plan's chunk size,
// the same result as the steps called directly, and the output dtype's range enforced.
TEST(RunLayer, ComposesChunkingAllocationAndTheFiniteCheck) {
  const LayerJob job = SyntheticJob(2, 600, 128, 30, 8);
  auto cpu = MakeCpuBackend(2);
  LayerPlan plan;
  plan.chunk_tokens = 200;
  LayerJob chunked_job = job;
  LayerOutcome chunked = RunLayer(*cpu, &chunked_job, plan);
  ASSERT_TRUE(chunked.result.ok()) << chunked.result.status();
  auto direct = CompactLayerInChunks(*cpu, job, 200, LayerAllocation{});
  ASSERT_TRUE(direct.ok());
  for (size_t h = 0; h < direct->heads.size(); ++h) EXPECT_EQ(chunked.result->heads[h].indices, direct->heads[h].indices);

  plan.chunk_tokens = 600;  // not longer than the chunk: one backend call
  LayerJob whole_job = job;
  LayerOutcome whole = RunLayer(*cpu, &whole_job, plan);
  ASSERT_TRUE(whole.result.ok());
  auto once = cpu->CompactLayer(job);
  ASSERT_TRUE(once.ok());
  for (size_t h = 0; h < once->heads.size(); ++h) EXPECT_EQ(whole.result->heads[h].indices, once->heads[h].indices);
  EXPECT_EQ(whole.replaced_heads, 0);

  // Values beyond fp16's range: an fp16 plan replaces the heads, an fp32 plan keeps them.
  LayerJob big = job;
  for (float& v : big.data.values) v *= 1e6f;
  plan.chunk_tokens = 0;
  plan.output_dtype = DType::kFloat16;
  LayerJob big16 = big;
  EXPECT_EQ(RunLayer(*cpu, &big16, plan).replaced_heads, 2);
  plan.output_dtype = DType::kFloat32;
  EXPECT_EQ(RunLayer(*cpu, &big, plan).replaced_heads, 0);
}

}  // namespace
}  // namespace kvcompact
