// Attention statistics of one block for a set of queries, computed over query chunks so that the
// n x T logit matrix never exists whole.
//   L = s * Q K^T + 1 b^T            (n x T)
//   M_i = max_j L_ij                 row maxima
//   m_i = sum_j exp(L_ij - M_i)      mass (shifted by M_i)
//   Y_i = softmax(L_i) V             outputs
//   score_j = reduce_i A_ij,  A = softmax(L)   (optional, for highest-attention selection;
//             the reduces are in core/method.h)
#pragma once

#include <optional>

#include "core/method.h"
#include "core/types.h"

namespace kvcompact {

struct BlockView {
  ConstMatrixMapF keys;     // T x d
  ConstMatrixMapF values;   // T x dv
  const float* bias;        // T, or nullptr for a fresh cache (b = 0)
  float scale;              // s
  Eigen::Index tokens() const { return keys.rows(); }
};

struct AttentionStats {
  VectorF row_max;   // n
  VectorF mass;      // n
  MatrixF outputs;   // n x dv
  VectorF scores;    // T; empty unless a reduce was requested
};

// `query_chunk` bounds the rows of L held at once (memory is query_chunk x T floats).
AttentionStats ComputeAttentionStats(const BlockView& block, const MatrixF& queries,
                                     std::optional<ScoreReduce> reduce, int query_chunk = 256);

// kRmsMax, kCoverage and kRmsCoverage are made from two parts: the RMS of the attention and a
// second accumulator (the largest attention for kRmsMax; for the coverage scores, how many
// queries attend most to each key).
inline bool IsCompositeScore(ScoreReduce r) {
  return r == ScoreReduce::kRmsMax || r == ScoreReduce::kCoverage || r == ScoreReduce::kRmsCoverage;
}
// A composite reduce's scores from its parts (both T), as every backend finishes them.
VectorF CompositeScores(ScoreReduce reduce, const VectorF& rms, const VectorF& second);

// Scores whose top-t is the union of the top-t of `a` and of `b`, taken alternately: a key's
// score is 1 - (its better rank of the two) / T. In float, ranks closer than T / 2^24 may tie
// (only for T above 2^24); ties go to the earlier token.
VectorF RankUnionScores(const VectorF& a, const VectorF& b);

// Logits of the queries against a subset of keys given as a matrix: s * Q C^T + 1 bias^T.
MatrixF SubsetLogits(const MatrixF& queries, const MatrixF& keys, const VectorF& bias, float scale);

}  // namespace kvcompact
