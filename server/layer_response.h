// Turns a compacted layer into response messages: HeadResult chunks that each fit the message
// limit, then a LayerDone with per-head figures and stage times.
#pragma once

#include <vector>

#include "core/layer.h"
#include "kvcompact/v1/kvcompact.pb.h"
#include "server/stream_plan.h"

namespace kvcompact::server {

// What the worker measured around a layer, reported in its LayerDone.
struct LayerReport {
  double decode_seconds = 0, queue_seconds = 0, run_seconds = 0;
  uint64_t device_bytes = 0;  // held by the backend once the layer was done
};

// `payload_bytes` receives the tensor bytes written (for metrics and the summary).
std::vector<v1::CompactResponse> EncodeLayer(const StreamPlan& plan, int32_t layer, int64_t tokens_in,
                                             const LayerResult& result, const LayerReport& times,
                                             uint64_t max_message_bytes, uint64_t* payload_bytes);

}  // namespace kvcompact::server
