// A Compact stream as the server's reactor handles it, without the transport: the header becomes
// a StreamPlan, chunks go through the LayerAssembler (with memory admission), ended layers are
// checked, allocated, compacted on the CPU backend when small, and encoded into responses. Any
// input must end in statuses, never in a crash, a leak or undefined behaviour. Built a second time
// with KVCOMPACT_FUZZ_DECODE_ONLY (fuzz_stream_decode): the same up to the compute, hundreds of
// times faster, for the input path.
#include <cstddef>
#include <cstdint>

#include "core/chunked.h"
#include "server/layer_assembler.h"
#include "server/layer_response.h"
#include "server/stream_plan.h"
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
    if (r.has_kv() && !assembler.IsClosed(r.kv().layer())) {
      if (!assembler.AddKV(r.kv()).ok()) assembler.Close(r.kv().layer());
    } else if (r.has_queries() && !assembler.IsClosed(r.queries().layer())) {
      if (!assembler.AddQueries(r.queries()).ok()) assembler.Close(r.queries().layer());
    } else if (r.has_layer_end() && !assembler.IsClosed(r.layer_end().layer())) {
      server::MemoryReservation held;
      absl::StatusOr<LayerJob> job = assembler.EndLayer(r.layer_end().layer(), &held);
      if (!job.ok()) {
        assembler.Close(r.layer_end().layer());
        continue;
      }
      if (!backend->CheckFits(*job).ok()) continue;
#ifdef KVCOMPACT_FUZZ_DECODE_ONLY
      continue;
#endif
      if (job->data.tokens * std::max<int64_t>(job->data.queries, 1) * job->data.heads > kMaxComputeCells) continue;
      const uint32_t layer = r.layer_end().layer();
      const int64_t tokens = job->data.tokens;
      absl::StatusOr<LayerResult> result;
      if (plan->chunk_tokens > 0 && tokens > plan->chunk_tokens) {
        result = CompactLayerInChunks(*backend, *job, plan->chunk_tokens, plan->layer_rule);
      } else {
        absl::Status allocated = AllocateLayer(*backend, &*job, plan->layer_rule);
        result = allocated.ok() ? backend->CompactLayer(*job) : absl::StatusOr<LayerResult>(allocated);
      }
      if (!result.ok()) continue;
      uint64_t bytes = 0;
      std::vector<v1::CompactResponse> out =
          server::EncodeLayer(*plan, static_cast<int32_t>(layer), tokens, *result, {}, limits.max_message_bytes, &bytes);
      if (out.empty() || !out.back().has_layer_done()) __builtin_trap();  // every layer ends with LayerDone
    }
  }
  if (memory.in_use() != 0 && assembler.open_layers() == 0) __builtin_trap();  // reservations are returned
  return 0;
}
