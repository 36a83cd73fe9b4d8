// What the assembler records of the dtypes a layer arrived in: backends compute the products in a
// 16-bit dtype only when every key, value and query of the layer arrived in it.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "server/host_buffers.h"
#include "server/layer_assembler.h"
#include "server/limits.h"
#include "server/memory_budget.h"
#include "server/stream_plan.h"

namespace kvcompact::server {
namespace {

constexpr int64_t kHeads = 2, kDim = 8, kTokens = 16, kQueries = 4;

v1::Tensor Zeros(v1::DType dtype, int64_t rows) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t s : {kHeads, rows, kDim}) t.add_shape(s);
  t.set_data(std::string(kHeads * rows * kDim * (dtype == v1::DTYPE_FP32 ? 4 : 2), '\0'));
  return t;
}

// Keys and values in two chunks (so a dtype can change between them) and, with `query`, queries.
DType AssembledDType(v1::DType key, v1::DType value, v1::DType second_chunk, v1::DType query) {
  v1::StreamHeader h;
  h.mutable_geometry()->set_num_layers(1);
  h.mutable_geometry()->set_num_kv_heads(kHeads);
  h.mutable_geometry()->set_head_dim(kDim);
  h.mutable_options()->mutable_budget()->set_ratio(4);
  if (query == v1::DTYPE_UNSPECIFIED) h.mutable_options()->set_method(v1::METHOD_TRUNCATE_RECENT);  // needs no queries
  absl::StatusOr<StreamPlan> plan = MakeStreamPlan(h);
  EXPECT_TRUE(plan.ok()) << plan.status();
  const Limits limits;
  MemoryBudget memory(64u << 20);
  LayerAssembler assembler(&*plan, &limits, &memory, 1);
  for (int half = 0; half < 2; ++half) {
    v1::KVChunk c;
    c.set_head_end(kHeads);
    c.set_token_begin(half * kTokens / 2);
    c.set_layer_tokens(kTokens);
    *c.mutable_keys() = Zeros(half == 0 ? key : second_chunk, kTokens / 2);
    *c.mutable_values() = Zeros(half == 0 ? value : second_chunk, kTokens / 2);
    EXPECT_TRUE(assembler.AddKV(c).ok());
  }
  if (query != v1::DTYPE_UNSPECIFIED) {
    v1::QueryChunk q;
    q.set_head_end(kHeads);
    q.set_layer_queries(kQueries);
    *q.mutable_queries() = Zeros(query, kQueries);
    EXPECT_TRUE(assembler.AddQueries(q).ok());
  }
  MemoryReservation held;
  absl::StatusOr<LayerJob> job = assembler.EndLayer(0, &held);
  EXPECT_TRUE(job.ok()) << job.status();
  return job.ok() ? job->data.inputs_dtype : DType::kFloat32;
}

TEST(LayerAssembler, InputsDTypeIsTheOneDTypeEverythingArrivedIn) {
  const auto bf16 = v1::DTYPE_BF16, fp16 = v1::DTYPE_FP16, fp32 = v1::DTYPE_FP32, none = v1::DTYPE_UNSPECIFIED;
  EXPECT_EQ(AssembledDType(bf16, bf16, bf16, bf16), DType::kBFloat16);
  EXPECT_EQ(AssembledDType(fp16, fp16, fp16, fp16), DType::kFloat16);
  EXPECT_EQ(AssembledDType(bf16, bf16, bf16, none), DType::kBFloat16);  // no queries: keys and values decide
  EXPECT_EQ(AssembledDType(fp32, fp32, fp32, fp32), DType::kFloat32);
  EXPECT_EQ(AssembledDType(bf16, bf16, bf16, fp32), DType::kFloat32);  // queries in fp32
  EXPECT_EQ(AssembledDType(bf16, fp16, bf16, bf16), DType::kFloat32);  // values in another 16-bit dtype
  EXPECT_EQ(AssembledDType(bf16, bf16, fp16, bf16), DType::kFloat32);  // a later chunk in another dtype
  EXPECT_EQ(AssembledDType(fp16, fp16, fp16, bf16), DType::kFloat32);
}

TEST(HostBufferPool, ReusesIdleStorageZeroedAndStaysWithinItsBound) {
  HostBufferPool pool(10000 * sizeof(float));
  std::vector<float> a = pool.TakeZeroed(6000);
  std::fill(a.begin(), a.end(), 7.f);
  const float* storage = a.data();
  pool.Give(std::move(a));
  EXPECT_EQ(pool.idle_bytes(), 6000 * sizeof(float));
  std::vector<float> b = pool.TakeZeroed(5000);  // fits in the idle buffer: same storage, zeros
  EXPECT_EQ(b.data(), storage);
  EXPECT_EQ(b.size(), 5000u);
  EXPECT_TRUE(std::all_of(b.begin(), b.end(), [](float x) { return x == 0.f; }));
  EXPECT_EQ(pool.idle_bytes(), 0u);
  std::vector<float> small(3000), big(8000);
  pool.Give(std::move(b));      // 6000 idle
  pool.Give(std::move(small));  // 9000 idle
  pool.Give(std::move(big));    // over the bound: freed
  EXPECT_EQ(pool.idle_bytes(), 9000 * sizeof(float));
  EXPECT_EQ(pool.TakeZeroed(2500).capacity(), 3000u);  // the smallest that fits
  EXPECT_EQ(pool.TakeZeroed(7000).capacity(), 7000u);  // none fits: allocated
  EXPECT_EQ(pool.idle_bytes(), 6000 * sizeof(float));
  pool.Give(std::vector<float>());  // nothing to keep
  EXPECT_EQ(pool.idle_bytes(), 6000 * sizeof(float));
}

}  // namespace
}  // namespace kvcompact::server
