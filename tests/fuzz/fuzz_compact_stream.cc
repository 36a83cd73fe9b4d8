// A Compact stream as the server's reactor handles it, without the transport: the header becomes
// a StreamPlan, chunks go through the LayerAssembler (with memory admission), ended layers are
// checked, allocated, compacted on the CPU backend when small, and encoded into responses. Any
// input must end in statuses, never in a crash, a leak or undefined behaviour. Built a second time
// with KVCOMPACT_FUZZ_DECODE_ONLY (fuzz_stream_decode): the same up to the compute, hundreds of
// times faster, for the input path.
#include <cstddef>
#include <cmath>
#include <cstdint>

#include "core/chunked.h"
#include "server/layer_assembler.h"
#include "server/layer_response.h"
#include "server/stream_plan.h"
#include "tests/fuzz/extreme_mutator.h"
#include "tests/fuzz/stream_codec.h"

namespace kvcompact {
namespace {

constexpr size_t kMaxMessages = 64;
constexpr int64_t kMaxComputeCells = 1 << 12;  // heads x T x max(n, 1) compacted; larger layers only assembled (speed)

server::Limits FuzzLimits() {
  server::Limits limits;
  limits.max_message_bytes = 1 << 20;
  limits.max_tokens_per_block = 1 << 14;
  limits.max_queries_per_layer = 1 << 12;
  limits.max_open_layers_per_stream = 4;
  return limits;
}

}  // namespace
}  // namespace kvcompact

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvcompact;
  static Backend* backend = MakeCpuBackend(1).release();
  static const server::Limits limits = FuzzLimits();
  std::vector<v1::CompactRequest> requests = fuzz::DecodeStream(data, size, kMaxMessages);
  if (requests.empty() || !requests[0].has_header()) return 0;
  absl::StatusOr<server::StreamPlan> plan = server::MakeStreamPlan(requests[0].header());
  if (!plan.ok()) return 0;
  server::MemoryBudget memory(64u << 20);
  server::LayerAssembler assembler(&*plan, &limits, &memory, 1);
  for (size_t i = 1; i < requests.size(); ++i) {
    const v1::CompactRequest& r = requests[i];
    const uint32_t layer = r.has_kv() ? r.kv().layer() : r.has_queries() ? r.queries().layer() : r.layer_end().layer();
    if (assembler.IsEnded(layer)) break;  // the reactor ends the stream INVALID_ARGUMENT here
    if (assembler.IsFailed(layer)) continue;
    if (r.has_kv()) {
      if (!assembler.AddKV(r.kv()).ok()) assembler.Fail(layer);
    } else if (r.has_queries()) {
      if (!assembler.AddQueries(r.queries()).ok()) assembler.Fail(layer);
    } else if (r.has_layer_end()) {
      server::MemoryReservation held;
      absl::StatusOr<LayerJob> job = assembler.EndLayer(r.layer_end().layer(), &held);
      if (!job.ok()) {
        assembler.Fail(layer);
        continue;
      }
      if (!backend->CheckFits(*job).ok()) continue;
#ifdef KVCOMPACT_FUZZ_DECODE_ONLY
      continue;
#endif
      if (job->data.tokens * std::max<int64_t>(job->data.queries, 1) * job->data.heads > kMaxComputeCells) continue;
      const int64_t tokens = job->data.tokens;
      absl::StatusOr<LayerResult> result;
      if (plan->chunk_tokens > 0 && tokens > plan->chunk_tokens) {
        result = CompactLayerInChunks(*backend, *job, plan->chunk_tokens, plan->layer_rule);
      } else {
        absl::Status allocated = AllocateLayer(*backend, &*job, plan->layer_rule);
        result = allocated.ok() ? backend->CompactLayer(*job) : absl::StatusOr<LayerResult>(allocated);
      }
      if (!result.ok()) continue;
      ReplaceNonFiniteHeads(*job, plan->output_dtype == DType::kFloat16 ? 65504.0f : 3.0e38f, &*result);
      for (const CompactedHead& h : result->heads) {  // status OK never carries NaN or Inf
        if (!h.keys.allFinite() || !h.beta.allFinite() || !h.values.allFinite()) __builtin_trap();
        if (h.quality.has_quality && !std::isfinite(h.quality.output_rel_error)) __builtin_trap();
      }
      uint64_t bytes = 0;
      std::vector<v1::CompactResponse> out =
          server::EncodeLayer(*plan, static_cast<int32_t>(layer), tokens, *result, {}, limits.max_message_bytes, &bytes);
      if (out.empty() || !out.back().has_layer_done()) __builtin_trap();  // every layer ends with LayerDone
    }
  }
  if (memory.in_use() != 0 && assembler.OpenLayers().empty()) __builtin_trap();  // reservations are returned
  return 0;
}

// Half of the mutations set numeric fields to edge values (tests/fuzz/extreme_mutator.h).
extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
  if (seed % 2 == 0) {
    if (size_t n = kvcompact::fuzz::MutateToEdgeValues(data, size, max_size, seed, kvcompact::kMaxMessages); n > 0) return n;
  }
  return LLVMFuzzerMutate(data, size, max_size);
}
