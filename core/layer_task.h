// One layer as the service compacts it: the sequence of core steps around a backend call, in one
// place, so that the server only speaks the protocol and the worker owns the compute.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "core/budget.h"
#include "core/dtype.h"
#include "core/layer.h"

namespace kvcompact {

struct LayerPlan {
  int64_t chunk_tokens = 0;      // > 0: blocks longer than this are compacted in chunks
  LayerAllocation rule;          // per-layer split of the budgets across heads
  DType output_dtype = DType::kFloat32;
};

struct LayerOutcome {
  absl::StatusOr<LayerResult> result = absl::UnknownError("not run");
  int64_t replaced_heads = 0;    // heads whose fit was not finite (or overflowed the output dtype)
  uint64_t device_bytes = 0;     // device memory the backend held afterwards (0: CPU backend)
};

// Largest finite magnitude of a result in `dtype` (fp16: 65504).
float OutputRange(DType dtype);

// Chunked when the plan says so and the block is longer; else the layer rule's budgets, then the
// backend. Heads with non-finite or out-of-range fits fall back to plain selection, so that an OK
// result never carries NaN or Inf. May change job->budgets (the rule's split).
LayerOutcome RunLayer(Backend& backend, LayerJob* job, const LayerPlan& plan);

}  // namespace kvcompact
