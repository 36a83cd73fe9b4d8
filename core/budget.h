// Budgets across heads (spec section 4): how a total number of compacted entries is split over the
// (layer, KV head) blocks of a request. Every rule meets its total exactly and keeps each head
// within [1, cap_h]; per-head t is reported back with the results.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/layer.h"

namespace kvcompact {

// The one rule for a ratio's budget: round(T / ratio) within [1, T] (0 when T is 0). A ratio that
// makes T / ratio at least T, infinite or NaN (a tiny, denormal, zero or NaN ratio) keeps all T.
int64_t RatioBudget(int64_t tokens, double ratio);

// Keys a head keeps: its budget, at most the block's T.
inline int64_t KeptKeys(int64_t budget, int64_t tokens) { return budget < tokens ? budget : tokens; }

// Integers t_h proportional to `shares` (water-filling: t_h = clamp(lambda * s_h, 1, cap_h) with
// lambda chosen so the sum is `total`), rounded by largest remainder. Needs heads <= total <= sum(caps).
absl::StatusOr<std::vector<int64_t>> WaterFill(const std::vector<double>& shares,
                                               const std::vector<int64_t>& caps, int64_t total);

// PyramidKV-like per-layer schedule: layer l of L weighs 1 + (spread - 1) (L - 1 - l) / (L - 1),
// so the first layer gets `spread` times the last one's budget. One share per (layer, head).
std::vector<double> PyramidShares(int64_t layers, int64_t heads_per_layer, double spread);

// KVzip-like global top-k across heads: each head keeps its best key, the rest of the total goes
// to the highest key scores over all heads (a head stops at its cap).
absl::StatusOr<std::vector<int64_t>> TopKAcrossHeads(const std::vector<VectorF>& scores,
                                                     const std::vector<int64_t>& caps, int64_t total);

// One head's error-versus-budget curve: (t, error) points.
using ErrorCurve = std::vector<std::pair<int64_t, double>>;

// Allocation by marginal gain: each curve is made non-increasing and replaced by its lower convex
// hull; tokens go to the segments with the steepest error decrease first (optimal for convex
// curves); the last segment is taken in part. Tokens beyond the curves' ends are water-filled.
absl::StatusOr<std::vector<int64_t>> AllocateByMarginalGain(const std::vector<ErrorCurve>& curves,
                                                            const std::vector<int64_t>& caps, int64_t total);

// Data-dependent rules, computed per layer from the layer's own inputs.
struct LayerAllocation {
  enum class Kind { kNone, kGlobalTopK, kSensitivity } kind = Kind::kNone;
  int64_t probe_queries = 512;   // queries sampled per head for the scores / error curves
  double head_cap = 0.75;        // t_h <= head_cap * T
};

// Replaces job->budgets (keeping their sum, the layer's total) by the rule's split. Sensitivity
// runs `backend` on a probe copy of the layer (sampled queries) at budgets total/H x {1/4 .. 4}
// and reads the held-out output errors; OMP methods are probed with highest-attention AM.
absl::Status AllocateLayer(Backend& backend, LayerJob* job, const LayerAllocation& rule);

}  // namespace kvcompact
