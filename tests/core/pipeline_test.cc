// The pipeline (core/pipeline.h) on its own: what it plans, which steps it runs for which heads,
// and what it decides from the steps' figures. The steps are the CPU backend's, wrapped to count
// calls and, where a test needs it, to change a figure.
#include <numeric>
#include <optional>

#include <gtest/gtest.h>

#include "core/cpu_steps.h"
#include "core/layer.h"
#include "core/pipeline.h"
#include "tests/core/synthetic_job.h"

namespace kvcompact {
namespace {

using testing::SyntheticJob;

class CountingSteps final : public LayerSteps {
 public:
  explicit CountingSteps(const LayerJob& job) {
    for (int64_t h = 0; h < job.data.heads; ++h) {
      if (job.data.queries > 0) queries_.push_back(job.data.HeadQueries(h));
    }
    std::vector<HeadInput> inputs;
    for (int64_t h = 0; h < job.data.heads; ++h) {
      inputs.push_back(HeadInput{job.data.HeadBlock(h), job.data.queries > 0 ? &queries_[h] : nullptr});
    }
    inner_ = std::make_unique<CpuLayerSteps>(std::move(inputs), nullptr);
  }

  BlockView Block(int64_t head) const override { return inner_->Block(head); }
  bool ComputesScore(ScoreReduce reduce) const override { return reduce != refused_score; }
  absl::Status Statistics(const CompactionPlan& plan, MatrixF* scores, StageSeconds* seconds) override {
    ++statistics;
    return inner_->Statistics(plan, scores, seconds);
  }
  absl::Status SelectOmp(const CompactionPlan& plan, const std::vector<int64_t>& heads, const MatrixF& scores,
                         std::vector<std::vector<int32_t>>* kept) override {
    omp_heads = heads;
    return inner_->SelectOmp(plan, heads, scores, kept);
  }
  absl::Status FitMass(const CompactionPlan& plan, std::vector<CompactedHead>* heads, StageSeconds* seconds) override {
    ++mass_fits;
    return inner_->FitMass(plan, heads, seconds);
  }
  absl::Status FitValuesAndEvaluate(const CompactionPlan& plan, const std::vector<CompactedHead>& selection,
                                    std::vector<CompactedHead>* heads, std::vector<HeadFigures>* figures,
                                    StageSeconds* seconds) override {
    ++value_fits;
    absl::Status s = inner_->FitValuesAndEvaluate(plan, selection, heads, figures, seconds);
    if (selection_wins_on && (*figures)[*selection_wins_on].selection) {
      (*figures)[*selection_wins_on].selection->output_rel_error = 0;  // as if selection had done better
    }
    return s;
  }

  std::optional<ScoreReduce> refused_score;
  std::optional<int64_t> selection_wins_on;
  int statistics = 0, mass_fits = 0, value_fits = 0;
  std::vector<int64_t> omp_heads;

 private:
  std::vector<MatrixF> queries_;
  std::unique_ptr<CpuLayerSteps> inner_;
};

TEST(PlanHeads, DecidesEachHeadsKeptKeysAndWhatRuns) {
  LayerJob job = SyntheticJob(3, 100, 20, 10, 1);
  job.budgets = {10, 100, 1000};  // below T, equal to T, far over
  absl::StatusOr<CompactionPlan> plan = PlanLayer(job);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->heads[0].t, 10);
  EXPECT_EQ(plan->heads[1].t, 100);
  EXPECT_EQ(plan->heads[2].t, 100);
  EXPECT_TRUE(plan->heads[0].fit);
  EXPECT_FALSE(plan->heads[0].unchanged);
  for (int h : {1, 2}) {
    EXPECT_TRUE(plan->heads[h].unchanged);
    EXPECT_FALSE(plan->heads[h].fit);
  }
  EXPECT_EQ(plan->FittedHeads(), std::vector<int64_t>{0});
  ASSERT_TRUE(plan->reduce.has_value()) << "head 0 ranks keys";
  EXPECT_EQ(plan->heads[2].options.seed, HeadOptionsFor(job, 2).seed);

  job.budgets = {100, 100, 100};
  plan = PlanLayer(job);
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(plan->reduce.has_value()) << "no head ranks keys: no scores";

  job.budgets = {10, 0, 10};
  plan = PlanLayer(job);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(plan.status().message().find("head 1: budget must be > 0"), std::string::npos) << plan.status();
  job.budgets = {10, 10};
  EXPECT_EQ(PlanLayer(job).status().code(), absl::StatusCode::kInvalidArgument);
  job.budgets = {10, 10, -5};
  EXPECT_EQ(PlanLayer(job).status().code(), absl::StatusCode::kInvalidArgument);

  // A budget at the edges of int64 is still just "keep everything".
  job.budgets = {std::numeric_limits<int64_t>::max(), 1, 99};
  plan = PlanLayer(job);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->heads[0].t, 100);
  EXPECT_EQ(plan->heads[1].t, 1);
  EXPECT_EQ(plan->heads[2].t, 99);
}

TEST(RunLayerPipeline, RefusesAScoreTheBackendDoesNotComputeBeforeAnyStep) {
  LayerJob job = SyntheticJob(2, 128, 32, 16, 2);
  job.options.score = ScoreReduce::kCoverage;
  CountingSteps steps(job);
  steps.refused_score = ScoreReduce::kCoverage;
  absl::StatusOr<LayerResult> result = RunLayerPipeline(*PlanLayer(job), steps, nullptr, {});
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(result.status().message().find("COVERAGE"), std::string::npos) << result.status();
  EXPECT_EQ(steps.statistics, 0) << "refused before any work";
}

TEST(RunLayerPipeline, KeepsPlainSelectionWhereItDoesBetterOnHeldOutQueries) {
  LayerJob job = SyntheticJob(2, 256, 80, 24, 3);
  CountingSteps steps(job);
  steps.selection_wins_on = 1;
  absl::StatusOr<LayerResult> result = RunLayerPipeline(*PlanLayer(job), steps, nullptr, {});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(steps.statistics, 1);
  EXPECT_EQ(steps.mass_fits, 1);
  EXPECT_EQ(steps.value_fits, 1);
  const CompactedHead& fitted = result->heads[0];
  const CompactedHead& kept = result->heads[1];
  EXPECT_FALSE(fitted.selection_kept);
  ASSERT_TRUE(kept.selection_kept);
  EXPECT_EQ(kept.quality.output_rel_error, 0.0f) << "the winning figures are reported";
  const BlockView block = job.data.HeadBlock(1);
  for (size_t r = 0; r < kept.indices.size(); ++r) {
    EXPECT_EQ(kept.beta[r], 0.0f) << "beta = b[S] (a fresh cache: 0)";
    for (int64_t c = 0; c < job.data.value_dim; ++c) EXPECT_EQ(kept.values(r, c), block.values(kept.indices[r], c));
  }
  bool fit_moved_something = false;
  for (size_t r = 0; r < fitted.indices.size(); ++r) fit_moved_something |= fitted.beta[r] != 0.0f;
  EXPECT_TRUE(fit_moved_something) << "head 0 keeps its fitted beta";
}

TEST(RunLayerPipeline, UnchangedHeadsAreReturnedWholeAndNotFitted) {
  LayerJob job = SyntheticJob(2, 64, 32, 16, 4);
  job.budgets = {16, 64};
  job.options.method = Method::kAmOmp;
  CountingSteps steps(job);
  absl::StatusOr<LayerResult> result = RunLayerPipeline(*PlanLayer(job), steps, nullptr, {});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(steps.omp_heads, std::vector<int64_t>{0}) << "OMP runs for the compacted head only";
  const CompactedHead& whole = result->heads[1];
  std::vector<int32_t> all(64);
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(whole.indices, all);
  EXPECT_TRUE(whole.keys.isApprox(MatrixF(job.data.HeadBlock(1).keys)));
  EXPECT_TRUE(whole.values.isApprox(MatrixF(job.data.HeadBlock(1).values)));
  EXPECT_EQ(whole.mass_fit_iterations, 0);
  EXPECT_TRUE(whole.quality.has_quality);
  EXPECT_LT(whole.quality.output_rel_error, 1e-5f) << "the whole block reproduces itself";
  EXPECT_EQ(result->heads[0].indices.size(), 16u);
}

TEST(RunLayerPipeline, WithoutQueriesStopsAfterSelection) {
  LayerJob job = SyntheticJob(2, 64, 0, 8, 5);
  job.options.method = Method::kTruncateRecent;
  CountingSteps steps(job);
  absl::StatusOr<LayerResult> result = RunLayerPipeline(*PlanLayer(job), steps, nullptr, {});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(steps.statistics + steps.mass_fits + steps.value_fits, 0);
  for (const CompactedHead& head : result->heads) {
    EXPECT_FALSE(head.quality.has_quality);
    EXPECT_EQ(head.indices, (std::vector<int32_t>{56, 57, 58, 59, 60, 61, 62, 63}));
  }
  job.options.method = Method::kAmHighestAttention;
  EXPECT_EQ(PlanLayer(job).status().code(), absl::StatusCode::kInvalidArgument) << "AM needs queries";
}

}  // namespace
}  // namespace kvcompact

namespace kvcompact {
namespace {

TEST(ScoreReduceName, RoundTripsEveryScoreAndRefusesOthers) {
  for (ScoreReduce r : {ScoreReduce::kRms, ScoreReduce::kMean, ScoreReduce::kMax, ScoreReduce::kRmsMax,
                        ScoreReduce::kCoverage, ScoreReduce::kRmsCoverage}) {
    EXPECT_EQ(ScoreReduceFromName(ScoreReduceName(r)), r);
  }
  EXPECT_FALSE(ScoreReduceFromName("rms").has_value()) << "the wire's upper-case names only";
  EXPECT_FALSE(ScoreReduceFromName("").has_value());
}

}  // namespace
}  // namespace kvcompact
