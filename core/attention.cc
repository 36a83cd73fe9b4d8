#include "core/attention.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace kvcompact {

AttentionStats ComputeAttentionStats(const BlockView& block, const MatrixF& queries,
                                     std::optional<ScoreReduce> reduce, int query_chunk) {
  const Eigen::Index n = queries.rows();
  const Eigen::Index T = block.tokens();
  AttentionStats stats;
  stats.row_max.resize(n);
  stats.mass.resize(n);
  stats.outputs.resize(n, block.values.cols());
  const bool squares = reduce && *reduce != ScoreReduce::kMean && *reduce != ScoreReduce::kMax;
  VectorF sum_sq, max_p, top_count;  // the accumulators the reduce needs
  if (squares) sum_sq = VectorF::Zero(T);
  if (reduce && (*reduce == ScoreReduce::kMax || *reduce == ScoreReduce::kRmsMax)) max_p = VectorF::Zero(T);
  if (reduce && (*reduce == ScoreReduce::kCoverage || *reduce == ScoreReduce::kRmsCoverage)) {
    top_count = VectorF::Zero(T);
  }
  if (reduce && *reduce == ScoreReduce::kMean) stats.scores = VectorF::Zero(T);

  Eigen::Map<const Eigen::RowVectorXf> bias(block.bias, block.bias ? T : 0);
  MatrixF probs;  // chunk x T: exp(L - M), later the softmax
  for (Eigen::Index r0 = 0; r0 < n; r0 += query_chunk) {
    const Eigen::Index rows = std::min<Eigen::Index>(query_chunk, n - r0);
    probs.noalias() = queries.middleRows(r0, rows) * block.keys.transpose();
    probs *= block.scale;
    if (block.bias) probs.rowwise() += bias;
    const VectorF row_max = probs.rowwise().maxCoeff();
    probs = (probs.colwise() - row_max).array().exp();
    const VectorF mass = probs.rowwise().sum();
    stats.row_max.segment(r0, rows) = row_max;
    stats.mass.segment(r0, rows) = mass;
    probs.array().colwise() /= mass.array();  // softmax rows
    stats.outputs.middleRows(r0, rows).noalias() = probs * block.values;
    if (!reduce) continue;
    if (*reduce == ScoreReduce::kMean) stats.scores += probs.colwise().sum().transpose();
    if (squares) sum_sq += probs.array().square().matrix().colwise().sum().transpose();
    if (max_p.size() > 0) max_p = max_p.cwiseMax(probs.colwise().maxCoeff().transpose());
    if (top_count.size() > 0) {
      for (Eigen::Index r = 0; r < rows; ++r) {
        Eigen::Index top = 0;
        probs.row(r).maxCoeff(&top);
        top_count[top] += 1.0f;
      }
    }
  }
  if (!reduce) return stats;
  const float nf = static_cast<float>(std::max<Eigen::Index>(n, 1));  // n = 0: every sum is 0
  const VectorF rms = squares ? VectorF((sum_sq / nf).cwiseSqrt()) : VectorF();
  switch (*reduce) {
    case ScoreReduce::kMean: stats.scores /= nf; break;
    case ScoreReduce::kRms: stats.scores = rms; break;
    case ScoreReduce::kMax: stats.scores = std::move(max_p); break;
    case ScoreReduce::kRmsMax: stats.scores = CompositeScores(*reduce, rms, max_p); break;
    case ScoreReduce::kCoverage:
    case ScoreReduce::kRmsCoverage: stats.scores = CompositeScores(*reduce, rms, top_count); break;
  }
  return stats;
}

VectorF CompositeScores(ScoreReduce reduce, const VectorF& rms, const VectorF& second) {
  // Coverage: RMS < 1 breaks ties between equal counts without reordering different counts.
  const auto coverage = [&] { return VectorF(second + 0.5f * rms); };
  switch (reduce) {
    case ScoreReduce::kRmsMax: return RankUnionScores(rms, second);
    case ScoreReduce::kCoverage: return coverage();
    case ScoreReduce::kRmsCoverage: return RankUnionScores(rms, coverage());
    default: return rms;
  }
}

VectorF RankUnionScores(const VectorF& a, const VectorF& b) {
  const Eigen::Index T = a.size();
  std::vector<int32_t> order(static_cast<size_t>(T));
  std::vector<int64_t> best_rank(static_cast<size_t>(T), T);
  for (const VectorF* s : {&a, &b}) {
    std::iota(order.begin(), order.end(), 0);
    // Descending score; equal scores rank the earlier token first, as TopK breaks ties.
    std::sort(order.begin(), order.end(), [s](int32_t x, int32_t y) {
      return (*s)[x] > (*s)[y] || ((*s)[x] == (*s)[y] && x < y);
    });
    for (Eigen::Index r = 0; r < T; ++r) best_rank[order[r]] = std::min<int64_t>(best_rank[order[r]], r);
  }
  VectorF scores(T);
  for (Eigen::Index j = 0; j < T; ++j) {
    scores[j] = static_cast<float>(static_cast<double>(T - best_rank[j]) / static_cast<double>(T));
  }
  return scores;
}

MatrixF SubsetLogits(const MatrixF& queries, const MatrixF& keys, const VectorF& bias, float scale) {
  MatrixF logits = queries * keys.transpose();
  logits *= scale;
  logits.rowwise() += bias.transpose();
  return logits;
}

}  // namespace kvcompact
