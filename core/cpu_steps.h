// The pipeline's steps on the host (core/pipeline.h): the CPU backend, and the reference every
// other backend is compared with. Heads run in parallel over a thread pool; stage seconds are
// summed over heads (CPU time).
#pragma once

#include <functional>
#include <vector>

#include "core/attention.h"
#include "core/pipeline.h"

namespace kvcompact {

class ThreadPool;

struct HeadInput {
  BlockView block;
  const MatrixF* queries = nullptr;  // null or empty: no queries
};

class CpuLayerSteps final : public LayerSteps {
 public:
  // `pool` may be null (heads one after another); the blocks and queries of `heads` must outlive
  // the steps. Once `cancelled` (may be empty) returns true, heads not yet started are skipped
  // (the pipeline then returns CANCELLED).
  CpuLayerSteps(std::vector<HeadInput> heads, ThreadPool* pool, std::function<bool()> cancelled = {});

  BlockView Block(int64_t head) const override { return heads_[head].block; }
  absl::Status Statistics(const CompactionPlan& plan, MatrixF* scores, StageSeconds* seconds) override;
  absl::Status SelectOmp(const CompactionPlan& plan, const std::vector<int64_t>& heads, const MatrixF& scores,
                         std::vector<std::vector<int32_t>>* kept) override;
  absl::Status FitMass(const CompactionPlan& plan, std::vector<CompactedHead>* heads, StageSeconds* seconds) override;
  absl::Status FitValuesAndEvaluate(const CompactionPlan& plan, const std::vector<CompactedHead>& selection,
                                    std::vector<CompactedHead>* heads, std::vector<HeadFigures>* figures,
                                    StageSeconds* seconds) override;

 private:
  // One head's queries split into fitting and held-out ones, their statistics, and how many of
  // the fitting queries are distinct (the fits' priors scale with it).
  struct HeadState {
    MatrixF fit_q, eval_q;
    AttentionStats fit_stats, eval_stats;
    int64_t distinct = 0;
  };
  std::vector<int64_t> AllHeads() const;
  // fn(h, &seconds of head h) for the heads in `list`, in parallel; their seconds added to `total`.
  void ForHeads(const std::vector<int64_t>& list, const std::function<void(int64_t, StageSeconds*)>& fn,
                StageSeconds* total);
  HeadQuality Measure(const CompactedHead& head, const HeadState& state, float scale) const;

  std::vector<HeadInput> heads_;
  ThreadPool* pool_;
  std::function<bool()> cancelled_;
  std::vector<HeadState> state_;
};

}  // namespace kvcompact
