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

TEST(HostBufferPool, TakeForOverwriteReusesStorageWithoutAPass) {
  HostBufferPool pool(10000 * sizeof(float));
  std::vector<float> a = pool.TakeForOverwrite(6000);
  EXPECT_EQ(a.size(), 6000u);
  std::fill(a.begin(), a.end(), 7.f);
  const float* storage = a.data();
  pool.Give(std::move(a));
  std::vector<float> b = pool.TakeForOverwrite(5000);  // same storage, old contents left
  EXPECT_EQ(b.data(), storage);
  EXPECT_EQ(b.size(), 5000u);
  EXPECT_EQ(b[4999], 7.f);
  pool.Give(std::move(b));
  std::vector<float> c = pool.TakeForOverwrite(5500);  // grown within capacity: only the tail is new
  EXPECT_EQ(c.data(), storage);
  EXPECT_EQ(c.size(), 5500u);
}

// Layer buffers come back to the pool holding a stream's keys and values; the next stream's layer
// must hold only what that stream sent, and a layer with a row missing is refused, not filled
// with the old contents.
TEST(LayerAssembler, AReusedBufferNeverCarriesAnotherStreamsData) {
  v1::StreamHeader h;
  h.mutable_geometry()->set_num_layers(1);
  h.mutable_geometry()->set_num_kv_heads(kHeads);
  h.mutable_geometry()->set_head_dim(kDim);
  h.mutable_options()->mutable_budget()->set_ratio(4);
  h.mutable_options()->set_method(v1::METHOD_TRUNCATE_RECENT);
  absl::StatusOr<StreamPlan> plan = MakeStreamPlan(h);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const Limits limits;
  HostBufferPool pool(1u << 20);
  auto chunk = [](float value, int64_t token_begin, int64_t rows) {
    v1::KVChunk c;
    c.set_head_end(kHeads);
    c.set_token_begin(token_begin);
    c.set_layer_tokens(kTokens);
    std::vector<float> v(kHeads * rows * kDim, value);
    for (auto* t : {c.mutable_keys(), c.mutable_values()}) {
      t->set_dtype(v1::DTYPE_FP32);
      for (int64_t s : {kHeads, rows, kDim}) t->add_shape(s);
      t->set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float)));
    }
    return c;
  };
  {
    LayerAssembler first(&*plan, &limits, nullptr, 1, &pool);
    ASSERT_TRUE(first.AddKV(chunk(7.f, 0, kTokens)).ok());
    absl::StatusOr<LayerJob> job = first.EndLayer(0);
    ASSERT_TRUE(job.ok()) << job.status();
    pool.GiveLayer(job->data);
  }
  {
    LayerAssembler partial(&*plan, &limits, nullptr, 1, &pool);
    ASSERT_TRUE(partial.AddKV(chunk(1.f, 0, kTokens / 2)).ok());
    absl::StatusOr<LayerJob> job = partial.EndLayer(0);
    EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(job.status().message().find("missing"), std::string_view::npos) << job.status();
  }
  LayerAssembler second(&*plan, &limits, nullptr, 1, &pool);
  ASSERT_TRUE(second.AddKV(chunk(1.f, 0, kTokens / 2)).ok());
  ASSERT_TRUE(second.AddKV(chunk(2.f, kTokens / 2, kTokens / 2)).ok());
  absl::StatusOr<LayerJob> job = second.EndLayer(0);
  ASSERT_TRUE(job.ok()) << job.status();
  for (const std::vector<float>* v : {&job->data.keys, &job->data.values}) {
    ASSERT_EQ(v->size(), static_cast<size_t>(kHeads * kTokens * kDim));
    for (size_t i = 0; i < v->size(); ++i) {
      const int64_t token = static_cast<int64_t>(i / kDim) % kTokens;
      ASSERT_EQ((*v)[i], token < kTokens / 2 ? 1.f : 2.f) << i;
    }
  }
}

}  // namespace
}  // namespace kvcompact::server
