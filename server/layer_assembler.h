// Builds fp32 LayerData from the KV and query chunks of one stream, validating each chunk against
// the stream plan and limits. Every rejection names the layer and what was wrong, so the reactor
// can report it as a LayerError and go on with the other layers.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <vector>

#include "absl/status/statusor.h"
#include "core/layer.h"
#include "kvcompact/v1/kvcompact.pb.h"
#include "server/limits.h"
#include "server/memory_budget.h"
#include "server/stream_plan.h"

namespace kvcompact::server {

class LayerAssembler {
 public:
  // `memory` (optional) admits each layer's buffers before they are allocated; `threads`: heads
  // compacted at once, for the working-set estimate.
  LayerAssembler(const StreamPlan* plan, const Limits* limits, MemoryBudget* memory = nullptr, int threads = 1)
      : plan_(plan), limits_(limits), memory_(memory), threads_(threads) {}

  // Each returns the payload bytes decoded. On error the layer is dropped (see IsClosed).
  absl::StatusOr<uint64_t> AddKV(const v1::KVChunk& chunk);
  absl::StatusOr<uint64_t> AddQueries(const v1::QueryChunk& chunk);
  // Checks the layer is complete and hands over its job (budgets filled in) and, when `memory` is
  // given, the layer's memory reservation, to be released once the job is done.
  absl::StatusOr<LayerJob> EndLayer(uint32_t layer, MemoryReservation* memory = nullptr);

  // A layer that ended or failed: later chunks for it are refused once and then ignored.
  bool IsClosed(uint32_t layer) const { return closed_.count(layer) > 0; }
  void Close(uint32_t layer);
  size_t open_layers() const { return open_.size(); }

 private:
  struct Pending {
    LayerData data;
    std::vector<uint8_t> kv_seen;     // heads x tokens
    std::vector<uint8_t> query_seen;  // heads x queries
    MemoryReservation memory;
  };
  absl::StatusOr<Pending*> OpenLayer(uint32_t layer);
  absl::Status Reserve(Pending& p, uint64_t bytes, absl::string_view what);

  const StreamPlan* plan_;
  int64_t first_tokens_ = 0;  // T of the first layer, for allocations across layers
  const Limits* limits_;
  MemoryBudget* memory_;
  int threads_;
  std::map<uint32_t, Pending> open_;
  std::set<uint32_t> closed_;
};

}  // namespace kvcompact::server
