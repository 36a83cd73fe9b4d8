// What a StreamHeader asks for, validated once at the start of a stream: geometry, the core
// options, and the budget rule that turns a layer's T into t per head.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/budget.h"
#include "core/compact_head.h"
#include "core/dtype.h"
#include "kvcompact/v1/kvcompact.pb.h"
#include "server/profiles.h"

namespace kvcompact::server {

struct StreamPlan {
  uint32_t num_layers = 0, num_kv_heads = 0;
  int64_t head_dim = 0, value_dim = 0;
  float scale = 0;
  HeadOptions options;            // budget filled per head by Budget()
  DType output_dtype = DType::kFloat32;
  bool return_indices = false;
  v1::Budget budget;
  std::string request_id;
  // Allocation over the whole request (pyramid, profile): one share per (layer, head), else empty.
  std::vector<double> request_shares;
  double head_cap = 0.75;
  // Allocation per layer from its inputs (global top-k, sensitivity), applied by the worker.
  LayerAllocation layer_rule;
  int64_t chunk_tokens = 0;        // > 0: chunked compaction (core/chunked.h)

  bool cross_layer() const { return !request_shares.empty(); }
  // t per head of `layer` for a block of T tokens (each >= 1). Cross-layer rules assume every
  // layer has this T (the assembler checks it).
  absl::StatusOr<std::vector<int64_t>> LayerBudgets(uint32_t layer, int64_t tokens) const;
};

absl::StatusOr<StreamPlan> MakeStreamPlan(const v1::StreamHeader& header, const ProfileRegistry* profiles = nullptr);

}  // namespace kvcompact::server
