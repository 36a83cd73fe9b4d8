// A result with status OK never carries NaN or Inf: heads whose fit is not finite (or beyond the
// output dtype's range) fall back to plain selection; cancellation stops a layer at a head.
#include <cmath>
#include <numeric>
#include <limits>

#include <gtest/gtest.h>

#include "core/layer.h"
#include "core/attention.h"
#include "core/compact_head.h"
#include "core/selection.h"
#include "tests/core/synthetic_job.h"

namespace kvcompact {
namespace {

using testing::SyntheticJob;

TEST(ReplaceNonFiniteHeads, FitsThatAreNotFiniteOrOutOfRangeFallBackToSelection) {
  LayerJob job = SyntheticJob(3, 256, 64, 32, 5);
  auto backend = MakeCpuBackend(1);
  absl::StatusOr<LayerResult> result = backend->CompactLayer(job);
  ASSERT_TRUE(result.ok()) << result.status();
  const LayerResult clean = *result;
  EXPECT_EQ(ReplaceNonFiniteHeads(job, 65504.0f, &*result), 0) << "finite fits within range are kept";
  result->heads[0].beta[3] = std::numeric_limits<float>::quiet_NaN();
  result->heads[1].values(2, 5) = 1e6f;  // beyond fp16
  result->heads[2].quality.output_rel_error = std::numeric_limits<float>::infinity();
  EXPECT_EQ(ReplaceNonFiniteHeads(job, 65504.0f, &*result), 2);
  for (int h : {0, 1}) {
    const CompactedHead& head = result->heads[h];
    const BlockView block = job.data.HeadBlock(h);
    ASSERT_EQ(head.indices, clean.heads[h].indices) << "the selection is kept";
    EXPECT_TRUE(head.selection_kept) << "and reported as such";
    for (size_t r = 0; r < head.indices.size(); ++r) {
      EXPECT_EQ(head.beta[r], 0.0f) << "beta = b[S] (no bias: 0)";
      for (int64_t c = 0; c < job.data.value_dim; ++c) EXPECT_EQ(head.values(r, c), block.values(head.indices[r], c));
    }
    EXPECT_TRUE(head.quality.has_quality);
    EXPECT_TRUE(std::isfinite(head.quality.output_rel_error));
    EXPECT_GT(head.quality.output_rel_error, 0.0f);
  }
  // Head 2: its fit was fine, only a figure was not: the figure is measured again, the fit kept.
  EXPECT_TRUE(result->heads[2].values.isApprox(clean.heads[2].values));
  EXPECT_TRUE(std::isfinite(result->heads[2].quality.output_rel_error));
  // With fp32 output 1e6 is in range: nothing to replace.
  result->heads[1].values(2, 5) = 1e6f;
  EXPECT_EQ(ReplaceNonFiniteHeads(job, 3.0e38f, &*result), 0);
}

TEST(Cancellation, ACancelledLayerStopsAndSaysSo) {
  LayerJob job = SyntheticJob(4, 256, 64, 32, 6);
  int checks = 0;
  job.cancelled = [&checks] { return ++checks > 1; };  // cancelled once the layer started
  auto backend = MakeCpuBackend(1);
  absl::StatusOr<LayerResult> result = backend->CompactLayer(job);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled) << result.status();
  // Once before the layer, once per head in its first step (all skipped), once after that step:
  // no later step ran.
  EXPECT_EQ(checks, 1 + 4 + 1);
  job.cancelled = [] { return false; };
  EXPECT_TRUE(backend->CompactLayer(job).ok());
}

// Cancelled while the last step runs (some heads done, the rest skipped): the layer is CANCELLED,
// never OK with heads half fitted.
TEST(Cancellation, ACancellationDuringTheLastStepIsNotAResult) {
  LayerJob job = SyntheticJob(4, 256, 64, 32, 7);
  int checks = 0;
  job.cancelled = [&checks] { return ++checks < 0; };  // counts the checks of a whole run
  auto backend = MakeCpuBackend(1);
  ASSERT_TRUE(backend->CompactLayer(job).ok());
  const int whole_run = checks;
  checks = 0;
  // True from the third-to-last check on: inside the last step, after its first heads.
  job.cancelled = [&checks, whole_run] { return ++checks > whole_run - 3; };
  absl::StatusOr<LayerResult> result = backend->CompactLayer(job);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled) << result.status();
}

// The reported errors when every kept key sits ~100 below the row's maximum (a key that was not
// kept dominates): outputs and mass come out right instead of underflowing to zero.
TEST(MeasureErrors, KeptKeysFarBelowTheRowMaximumDoNotUnderflow) {
  const int T = 6, d = 2, dv = 2;
  MatrixF K(T, d), V(T, dv), Q(1, d);
  K << 100, 0, 0, 0, 0, 1, 0, -1, 1, 1, -1, 1;
  V << 9, 9, 1, 2, 3, 4, 5, 6, 7, 8, 2, 1;
  Q << 1, 0.5f;
  const BlockView block{ConstMatrixMapF(K.data(), T, d), ConstMatrixMapF(V.data(), T, dv), nullptr, 1.0f};
  const AttentionStats truth = ComputeAttentionStats(block, Q, std::nullopt, 256);
  CompactedHead head;  // keys 1..5 kept, key 0 (logit 100) dropped; beta 0
  head.indices = {1, 2, 3, 4, 5};
  head.keys = K.bottomRows(5);
  head.values = V.bottomRows(5);
  head.beta = VectorF::Zero(5);
  float out_err = 0, mass_err = 0;
  MeasureErrors(head, Q, truth, 1.0f, &out_err, &mass_err);
  // float64 reference: the compacted output is the softmax over keys 1..5 of their values.
  Eigen::VectorXd l(5), w(5);
  for (int j = 0; j < 5; ++j) l[j] = K.row(j + 1).cast<double>().dot(Q.row(0).cast<double>());
  w = (l.array() - l.maxCoeff()).exp();
  const Eigen::RowVectorXd y_hat = (w.transpose() * V.bottomRows(5).cast<double>()) / w.sum();
  const Eigen::RowVectorXd y = truth.outputs.row(0).cast<double>();
  const double want = (y_hat - y).norm() / y.norm();
  EXPECT_NEAR(out_err, want, 1e-4 * want) << "not the 100% of an all-zero output";
  EXPECT_GT(mass_err, 0.99f);  // the kept keys carry e^-100 of the mass
}

TEST(TopK, EqualScoresGoToEarlierTokens) {
  VectorF scores(8);
  scores << 1, 5, 5, 2, 5, 5, 0, 5;
  EXPECT_EQ(TopK(scores, 2), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(TopK(scores, 4), (std::vector<int32_t>{1, 2, 4, 5}));
  const VectorF flat = VectorF::Constant(100, 0.25f);
  std::vector<int32_t> first(10);
  std::iota(first.begin(), first.end(), 0);
  EXPECT_EQ(TopK(flat, 10), first);
}

}  // namespace
}  // namespace kvcompact
