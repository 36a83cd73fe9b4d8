// The server's front end alone: one stream's layers of bf16 chunks decoded into layer buffers by
// the LayerAssembler (no gRPC, no compute), with buffers allocated afresh per layer or reused
// through the HostBufferPool as the server does. BENCH-B's geometry by default. Prints seconds per
// layer and wire GB/s, and a final JSON line.
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "core/dtype.h"
#include "server/host_buffers.h"
#include "server/layer_assembler.h"
#include "server/limits.h"
#include "server/memory_budget.h"
#include "server/stream_plan.h"

ABSL_FLAG(uint32_t, layers, 8, "layers assembled per mode");
ABSL_FLAG(uint32_t, kv_heads, 8, "KV heads");
ABSL_FLAG(uint32_t, head_dim, 128, "head dim");
ABSL_FLAG(uint32_t, tokens, 60000, "T per layer");
ABSL_FLAG(uint32_t, queries, 8192, "reference queries per KV head");
ABSL_FLAG(uint32_t, chunk_tokens, 4096, "tokens per KV chunk message");

namespace {

using namespace kvcompact;
using Clock = std::chrono::steady_clock;

v1::Tensor Bf16Tensor(int64_t heads, int64_t rows, int64_t width, uint32_t seed) {
  std::vector<float> v(heads * rows * width);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(((i * 2654435761u + seed) >> 7) % 2001) / 1000.f - 1.f;
  std::string bytes(v.size() * 2, '\0');
  EncodeFromFloat(v.data(), v.size(), DType::kBFloat16, bytes.data());
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_BF16);
  for (int64_t s : {heads, rows, width}) t.add_shape(s);
  t.set_data(std::move(bytes));
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t H = absl::GetFlag(FLAGS_kv_heads), d = absl::GetFlag(FLAGS_head_dim), T = absl::GetFlag(FLAGS_tokens),
                n = absl::GetFlag(FLAGS_queries), step = absl::GetFlag(FLAGS_chunk_tokens);
  const uint32_t layers = absl::GetFlag(FLAGS_layers);
  v1::StreamHeader header;
  header.mutable_geometry()->set_num_layers(layers);
  header.mutable_geometry()->set_num_kv_heads(static_cast<uint32_t>(H));
  header.mutable_geometry()->set_head_dim(static_cast<uint32_t>(d));
  header.mutable_options()->mutable_budget()->set_ratio(50);
  absl::StatusOr<server::StreamPlan> plan = server::MakeStreamPlan(header);
  if (!plan.ok()) {
    fprintf(stderr, "%s\n", plan.status().ToString().c_str());
    return 1;
  }
  // One layer's messages, reused for every layer (only the layer number changes).
  std::vector<v1::KVChunk> kv;
  uint64_t wire = 0;
  for (int64_t t0 = 0; t0 < T; t0 += step) {
    const int64_t rows = std::min(step, T - t0);
    v1::KVChunk c;
    c.set_head_end(static_cast<uint32_t>(H));
    c.set_token_begin(static_cast<uint64_t>(t0));
    c.set_layer_tokens(static_cast<uint64_t>(T));
    *c.mutable_keys() = Bf16Tensor(H, rows, d, 1);
    *c.mutable_values() = Bf16Tensor(H, rows, d, 2);
    wire += c.keys().data().size() + c.values().data().size();
    kv.push_back(std::move(c));
  }
  v1::QueryChunk q;
  q.set_head_end(static_cast<uint32_t>(H));
  q.set_layer_queries(static_cast<uint64_t>(n));
  *q.mutable_queries() = Bf16Tensor(H, n, d, 3);
  wire += q.queries().data().size();

  server::Limits limits;
  limits.max_open_layers_per_stream = 4;
  double per_layer[2] = {0, 0};
  for (int pooled = 0; pooled < 2; ++pooled) {
    server::MemoryBudget memory(uint64_t{64} << 30);
    server::HostBufferPool pool(uint64_t{4} << 30);
    server::LayerAssembler assembler(&*plan, &limits, &memory, 1, pooled ? &pool : nullptr);
    const auto start = Clock::now();
    for (uint32_t layer = 0; layer < layers; ++layer) {
      for (v1::KVChunk& c : kv) {
        c.set_layer(layer);
        if (auto s = assembler.AddKV(c); !s.ok()) return fprintf(stderr, "%s\n", s.status().ToString().c_str()), 1;
      }
      q.set_layer(layer);
      if (auto s = assembler.AddQueries(q); !s.ok()) return fprintf(stderr, "%s\n", s.status().ToString().c_str()), 1;
      server::MemoryReservation held;
      absl::StatusOr<LayerJob> job = assembler.EndLayer(layer, &held);
      if (!job.ok()) return fprintf(stderr, "%s\n", job.status().ToString().c_str()), 1;
      if (pooled) pool.GiveLayer(job->data);  // as the worker does once the layer is compacted
    }
    per_layer[pooled] = std::chrono::duration<double>(Clock::now() - start).count() / layers;
    printf("%-34s %8.4f s per layer  %6.2f GB/s of wire\n", pooled ? "buffers reused (HostBufferPool)" : "buffers allocated per layer",
           per_layer[pooled], wire / per_layer[pooled] / 1e9);
  }
  printf("{\"bench\":\"assembler\",\"layers\":%u,\"wire_bytes_per_layer\":%llu,\"fresh_s\":%.4f,\"pooled_s\":%.4f}\n", layers,
         static_cast<unsigned long long>(wire), per_layer[0], per_layer[1]);
  return 0;
}
