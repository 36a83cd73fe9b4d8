#include "core/attention.h"

#include <algorithm>
#include <cmath>

namespace kvcompact {

AttentionStats ComputeAttentionStats(const BlockView& block, const MatrixF& queries,
                                     std::optional<ScoreReduce> reduce, int query_chunk) {
  const Eigen::Index n = queries.rows();
  const Eigen::Index T = block.tokens();
  AttentionStats stats;
  stats.row_max.resize(n);
  stats.mass.resize(n);
  stats.outputs.resize(n, block.values.cols());
  if (reduce) stats.scores = VectorF::Zero(T);

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
    switch (*reduce) {
      case ScoreReduce::kMean: stats.scores += probs.colwise().sum().transpose(); break;
      case ScoreReduce::kRms:
        stats.scores += probs.array().square().matrix().colwise().sum().transpose();
        break;
      case ScoreReduce::kMax:
        stats.scores = stats.scores.cwiseMax(probs.colwise().maxCoeff().transpose());
        break;
    }
  }
  if (reduce && n > 0) {
    if (*reduce == ScoreReduce::kMean) stats.scores /= static_cast<float>(n);
    if (*reduce == ScoreReduce::kRms) stats.scores = (stats.scores / static_cast<float>(n)).cwiseSqrt();
  }
  return stats;
}

MatrixF SubsetLogits(const MatrixF& queries, const MatrixF& keys, const VectorF& bias, float scale) {
  MatrixF logits = queries * keys.transpose();
  logits *= scale;
  logits.rowwise() += bias.transpose();
  return logits;
}

}  // namespace kvcompact
