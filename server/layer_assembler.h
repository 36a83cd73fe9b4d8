// Builds fp32 LayerData from the KV and query chunks of one stream, validating each chunk against
// the stream plan and limits. Every rejection names the layer and what was wrong, so the reactor
// can report it as a LayerError and go on with the other layers.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <map>
#include <optional>
#include <set>
#include <vector>

#include "absl/status/statusor.h"
#include "core/layer.h"
#include "kvcompact/v1/kvcompact.pb.h"
#include "server/host_buffers.h"
#include "server/limits.h"
#include "server/memory_budget.h"
#include "server/stream_plan.h"

namespace kvcompact::server {

class LayerAssembler {
 public:
  // `memory` (optional) admits each layer's buffers before they are allocated; `threads`: heads
  // compacted at once, for the working-set estimate.
  // `buffers`: where the layer buffers come from (null: allocated afresh).
  LayerAssembler(const StreamPlan* plan, const Limits* limits, MemoryBudget* memory = nullptr, int threads = 1,
                 HostBufferPool* buffers = nullptr)
      : plan_(plan), limits_(limits), memory_(memory), threads_(threads), buffers_(buffers) {}

  // Each returns the payload bytes decoded. On error the layer is dropped (see IsClosed).
  absl::StatusOr<uint64_t> AddKV(const v1::KVChunk& chunk);
  absl::StatusOr<uint64_t> AddQueries(const v1::QueryChunk& chunk);
  // Checks the layer is complete and hands over its job (budgets filled in) and, when `memory` is
  // given, the layer's memory reservation, to be released once the job is done.
  absl::StatusOr<LayerJob> EndLayer(uint32_t layer, MemoryReservation* memory = nullptr);

  // A layer that failed: its later chunks are ignored (the failure was reported once).
  bool IsFailed(uint32_t layer) const { return failed_.count(layer) > 0; }
  // A layer that ended: a chunk or a LayerEnd for it again is a protocol error of the stream.
  bool IsEnded(uint32_t layer) const { return ended_.count(layer) > 0; }
  // Drops the layer's buffers and reservation; its later chunks are ignored.
  void Fail(uint32_t layer);
  // The layers being received (chunks seen, no LayerEnd yet).
  std::vector<uint32_t> OpenLayers() const;
  // Open layers that received no chunk within `idle` seconds, or opened more than `max_age`
  // seconds ago (a bound of 0 is off), each with the reason.
  std::vector<std::pair<uint32_t, std::string>> StaleLayers(std::chrono::steady_clock::time_point now, double idle,
                                                            double max_age) const;

 private:
  struct Pending {
    LayerData data;
    std::vector<uint8_t> kv_seen;     // heads x tokens
    std::vector<uint8_t> query_seen;  // heads x queries
    std::optional<DType> wire;        // the one dtype keys, values and queries arrived in, if one
    MemoryReservation memory;
    std::chrono::steady_clock::time_point opened, last_chunk;
  };
  absl::StatusOr<Pending*> OpenLayer(uint32_t layer);
  std::vector<float> Zeroed(int64_t count);  // a layer buffer of zeros, from buffers_ when set
  std::vector<float> ForOverwrite(int64_t count);  // one every element of which is written before use
  absl::Status Reserve(Pending& p, uint64_t bytes, absl::string_view what);

  const StreamPlan* plan_;
  int64_t first_tokens_ = 0;  // T of the first layer, for allocations across layers
  const Limits* limits_;
  MemoryBudget* memory_;
  int threads_;
  HostBufferPool* buffers_;
  std::map<uint32_t, Pending> open_;
  std::set<uint32_t> failed_, ended_;
};

}  // namespace kvcompact::server
