// What a StreamHeader asks for, validated once at the start of a stream: geometry, the core
// options, and the budget rule that turns a layer's T into t per head.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "core/compact_head.h"
#include "core/dtype.h"
#include "kvcompact/v1/kvcompact.pb.h"

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

  // t for (layer, head) of a block of T tokens; always >= 1.
  int64_t Budget(uint32_t layer, uint32_t head, int64_t tokens) const;
};

absl::StatusOr<StreamPlan> MakeStreamPlan(const v1::StreamHeader& header);

}  // namespace kvcompact::server
