// The compaction pipeline, written once for every backend. Per layer:
//   statistics of the fitting queries (row max, mass, outputs; key scores where the method ranks
//   keys) and of the held-out ones
//   -> key selection (on the host from the scores, or OMP by the backend)
//   -> mass fit (beta) -> value fit (C_v)
//   -> evaluation of the fit and of plain selection of the same keys on the held-out queries; the
//      better of the two is returned (never worse than the simple thing).
// Backends implement LayerSteps: each step covers all heads of a layer (ragged budgets) in one call.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/compact_head.h"
#include "core/method.h"
#include "core/types.h"

namespace kvcompact {

class ThreadPool;
struct LayerJob;
struct LayerResult;

// What the pipeline does with one head.
struct HeadPlan {
  HeadOptions options;     // its budget and seed
  int64_t t = 0;           // keys kept: the one place the budget becomes t
  bool unchanged = false;  // budget >= T: the block as it is (no scores, no fit)
  bool fit = false;        // the AM fit runs (the method fits, queries were given, not unchanged)
};

struct CompactionPlan {
  const MethodSpec* spec = nullptr;
  int64_t tokens = 0;
  bool has_queries = false;
  std::optional<ScoreReduce> reduce;  // key scores the statistics compute (a method that ranks keys)
  std::vector<HeadPlan> heads;
  std::vector<int64_t> FittedHeads() const;
};

// Checks and plans heads with these options over `tokens` tokens: every budget > 0, queries where
// the method needs them. Errors name the head where there is more than one.
absl::StatusOr<CompactionPlan> PlanHeads(std::vector<HeadOptions> options, int64_t tokens, bool has_queries);
// The same for a layer job (one budget per head, the seeds of HeadOptionsFor).
absl::StatusOr<CompactionPlan> PlanLayer(const LayerJob& job);

// Error figures of one compacted head (HeadQuality without has_quality).
struct HeadFigures {
  HeadQuality fitted;                    // of the head as fitted (or selected, where nothing is fitted)
  std::optional<HeadQuality> selection;  // fitted heads with held-out queries: plain selection's
};

// The steps a backend runs, each for every head of a layer. `plan` is the one the pipeline was
// given; heads are indexed 0..plan.heads.size()-1.
class LayerSteps {
 public:
  virtual ~LayerSteps() = default;
  // The head's block on the host (the pipeline gathers C_k, b_S and V_S from it).
  virtual BlockView Block(int64_t head) const = 0;
  // False for key scores this backend does not compute (the pipeline refuses the job first).
  virtual bool ComputesScore(ScoreReduce reduce) const { (void)reduce; return true; }
  // Statistics of every head's fitting and held-out queries; with plan.reduce, each head's key
  // scores into row h of `scores` (heads x T; rows of unchanged heads may be left unset).
  virtual absl::Status Statistics(const CompactionPlan& plan, MatrixF* scores, StageSeconds* seconds) = 0;
  // OMP key selection of `heads` from their scores: ascending positions, t per head, into (*kept)[h].
  virtual absl::Status SelectOmp(const CompactionPlan& plan, const std::vector<int64_t>& heads, const MatrixF& scores,
                                 std::vector<std::vector<int32_t>>* kept) = 0;
  // The mass fit of the fitted heads: (*heads)[h] holds the selection (indices, keys, beta = b_S);
  // its beta becomes log w + b_S, with mass_fit_converged and mass_fit_iterations.
  virtual absl::Status FitMass(const CompactionPlan& plan, std::vector<CompactedHead>* heads, StageSeconds* seconds) = 0;
  // The value fit of the fitted heads (their values, from (*heads)[h] with the fitted beta) and
  // the error figures of every head; `selection` holds plain selection of each fitted head
  // (indices, keys, beta = b_S; its values V_S are not gathered; empty entries elsewhere), whose
  // figures are measured too where queries are held out.
  virtual absl::Status FitValuesAndEvaluate(const CompactionPlan& plan, const std::vector<CompactedHead>& selection,
                                            std::vector<CompactedHead>* heads, std::vector<HeadFigures>* figures,
                                            StageSeconds* seconds) = 0;
};

// Runs the pipeline: `pool` (may be null) spreads the host's selection over heads; `cancelled`
// (may be empty) is checked between steps.
absl::StatusOr<LayerResult> RunLayerPipeline(const CompactionPlan& plan, LayerSteps& steps, ThreadPool* pool,
                                             const std::function<bool()>& cancelled);

}  // namespace kvcompact
