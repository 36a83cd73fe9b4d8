#include "core/layer_task.h"

#include "core/chunked.h"

namespace kvcompact {

float OutputRange(DType dtype) { return dtype == DType::kFloat16 ? 65504.0f : 3.0e38f; }

LayerOutcome RunLayer(Backend& backend, LayerJob* job, const LayerPlan& plan) {
  LayerOutcome out;
  if (plan.chunk_tokens > 0 && job->data.tokens > plan.chunk_tokens) {
    out.result = CompactLayerInChunks(backend, *job, plan.chunk_tokens, plan.rule);
  } else if (absl::Status allocated = AllocateLayer(backend, job, plan.rule); !allocated.ok()) {
    out.result = allocated;
  } else {
    out.result = backend.CompactLayer(*job);
  }
  if (out.result.ok()) out.replaced_heads = ReplaceNonFiniteHeads(*job, OutputRange(plan.output_dtype), &*out.result);
  out.device_bytes = backend.device_bytes_reserved();
  return out;
}

}  // namespace kvcompact
