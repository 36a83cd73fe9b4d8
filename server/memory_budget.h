// Admission control for host memory: every layer a stream is receiving or compacting holds a
// reservation sized by an estimate of its buffers; a layer that would take the server over its
// bound is refused with RESOURCE_EXHAUSTED instead of being allocated (no OOM kill).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/budget.h"
#include "core/layer.h"

namespace kvcompact::server {

class MemoryBudget;

// Bytes held against a MemoryBudget until destroyed. Move-only.
class MemoryReservation {
 public:
  MemoryReservation() = default;
  MemoryReservation(MemoryReservation&& other) noexcept { *this = std::move(other); }
  MemoryReservation& operator=(MemoryReservation&& other) noexcept;
  ~MemoryReservation() { Release(); }

  uint64_t bytes() const { return bytes_; }
  // Takes over what `other` holds (same budget).
  void Merge(MemoryReservation&& other);
  // Gives back `bytes` of what is held (at most all of it).
  void ReleasePart(uint64_t bytes);
  void Release();

 private:
  friend class MemoryBudget;
  MemoryBudget* budget_ = nullptr;
  uint64_t bytes_ = 0;
};

class MemoryBudget {
 public:
  // `on_change` (optional) sees the bytes in use after every change (a metrics gauge).
  explicit MemoryBudget(uint64_t limit_bytes, std::function<void(uint64_t)> on_change = {})
      : limit_(limit_bytes), on_change_(std::move(on_change)) {}
  // A reservation of `bytes`, or RESOURCE_EXHAUSTED saying what `what` needed and what is free.
  absl::StatusOr<MemoryReservation> Reserve(uint64_t bytes, absl::string_view what);
  // Counts memory that is already held and cannot be refused (results computed for a stream,
  // waiting to be written): later reservations see it.
  MemoryReservation Account(uint64_t bytes);
  uint64_t limit() const { return limit_; }
  uint64_t in_use() const { return in_use_.load(); }

 private:
  friend class MemoryReservation;
  void Changed() const {
    if (on_change_) on_change_(in_use_.load());
  }
  const uint64_t limit_;
  std::function<void(uint64_t)> on_change_;
  std::atomic<uint64_t> in_use_{0};
};

// Host bytes of one layer while it is received and compacted: the fp32 K/V (and bias) buffers
// with their received-row maps, then per head being compacted a copy of its block and the
// attention working set. `queries` 0: the key/value part alone.
uint64_t LayerKeyValueBytes(int64_t heads, int64_t tokens, int64_t head_dim, int64_t value_dim);
uint64_t LayerQueryBytes(int64_t heads, int64_t tokens, int64_t queries, int64_t head_dim, int64_t value_dim,
                         int threads);

// Working memory of a layer's method beyond LayerQueryBytes, known once its budgets are: OMP's
// candidate-pool Gram matrices (fp32 and fp64 copies, per head compacted at once), the copy of
// the layer a sensitivity split compacts, the per-chunk copies of chunked compaction. Saturates
// instead of wrapping.
uint64_t LayerMethodBytes(const LayerJob& job, const LayerAllocation& rule, int64_t chunk_tokens, int threads);

// The default bound: 70% of the memory this process may use (cgroup limit or physical RAM).
uint64_t DefaultHostMemoryLimit();

}  // namespace kvcompact::server
