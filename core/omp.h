// Orthogonal matching pursuit on the mass system (spec section 3), in Gram form.
//
// With Phi_P the n x P mass features of a candidate pool P (Phi_ij = exp(L_ij - M_i)), the Gram
// matrix G = Phi_P^T Phi_P and c = Phi_P^T m, the correlation of the residual r = m - Phi_S w with
// candidate j is (Phi^T r)_j = c_j - G_jS w. After one pass over the queries the greedy loop never
// touches the n queries again: a step costs O(P |S|), a refit is a bounded NNLS on G_SS.
#pragma once

#include <cstdint>
#include <vector>

#include "core/types.h"

namespace kvcompact {

struct OmpParams {
  int64_t budget = 0;           // t: keys to select (at most the pool size)
  int keys_per_step = 1;        // k: keys added per greedy step
  int refit_interval = 1;       // refit w every this many steps (and always at the end)
  double progressive = 0;       // > 0: k grows to max(k, ceil(progressive * |S|)) as S grows
  double w_lo = 1e-12, w_hi = 1096.6331584284585;  // bounds on w: [1e-12, exp(7)]
  double drop_log_weight = -7;  // after selection, keys with log w below this are dropped...
  int drop_rounds = 3;          // ...and replaced by further selection, at most this many times
  // Refits take the unconstrained solution (incremental Cholesky) clamped to the bounds when it
  // leaves them: it steers the selection and the drop rule, and the mass fit that follows the
  // selection solves the bounded problem exactly anyway. True: every refit solves the bounded
  // problem (the textbook algorithm; O(|S|^3) per refit).
  bool exact_refits = false;
};

struct OmpResult {
  std::vector<int32_t> selected;  // indices into the pool, in the order they were chosen
  VectorD w;                      // weights of `selected` at the last refit (exact with exact_refits)
  int steps = 0, refits = 0, dropped = 0;
  int unconstrained_refits = 0;   // refits solved by the incremental Cholesky factor alone
  int clamped_refits = 0;         // intermediate refits that took the clamped unconstrained solution
};

// The token positions of a selection over `pool` (pool[i] = token of candidate i), ascending.
std::vector<int32_t> SelectedPositions(const OmpResult& result, const std::vector<int32_t>& pool);

// The reads the greedy loop makes of the pool's Gram matrix G (symmetric), wherever G lives: it
// only ever touches the rows of keys it selected (and the diagonal), so a backend that built G on
// its device answers them there and G never travels (the CUDA backend: kernels/device_omp_gram.h).
class OmpGram {
 public:
  virtual ~OmpGram() = default;
  virtual int64_t size() const = 0;
  virtual double MeanDiagonal() = 0;
  // *into += G[:, cols[0]] w[0] + G[:, cols[1]] w[1] + ..., added in this order, in float64.
  virtual void Accumulate(const std::vector<int32_t>& cols, const VectorD& w, VectorD* into) = 0;
  // G[rows, cols] in float64.
  virtual MatrixD Block(const std::vector<int32_t>& rows, const std::vector<int32_t>& cols) = 0;
};

// Greedy selection of params.budget of the gram.size() candidates.
OmpResult SelectOmp(OmpGram& gram, const VectorD& rhs, const OmpParams& params);
// The same on a host matrix, float64 (the CPU backend) or fp32 (half the memory traffic; weights,
// residuals and the factor stay float64).
OmpResult SelectOmp(const MatrixD& gram, const VectorD& rhs, const OmpParams& params);
OmpResult SelectOmp(const ConstMatrixMapF& gram, const VectorD& rhs, const OmpParams& params);

}  // namespace kvcompact
