// Steps 2 and 3 of Attention Matching for a chosen key set S (see docs/attention-matching spec):
//   mass:   Phi_ij = exp(L_ij - M_i), j in S;  w = argmin ||Phi w - m||^2, w_lo <= w <= w_hi;
//           beta_j = log w_j + b_j   (the + b_j keeps re-compaction of compacted blocks correct)
//   values: X = softmax_S(s Q C_k^T + beta);  C_v = (X^T X + lambda I)^-1 X^T Y,
//           lambda = ridge * mean(diag(X^T X))
// Gram matrices are accumulated in fp32 and solved in float64.
#pragma once

#include "core/bounded_lsq.h"
#include "core/types.h"

namespace kvcompact {

// The mass fit stops its bounded NNLS after this many projected Newton iterations (each a t x t
// Cholesky). Every iterate is feasible and lowers the objective; the tail iterations only shuffle
// a few weights on and off their bounds: from n_fit = t/4 to 6t, stopping at 6 leaves the
// objective within 2e-3 (relative) of the 200-iteration result and the held-out output error
// within 1% of it, better as often as worse; on the GPU sweep (T 30k-120k, t 1,200-3,000) the
// held-out error at 6 is at most 0.0001 above 12's at every point, the solver about 40% faster
// (bench/bench_lsq_caps, bench/gpu_sweep.sh, docs/BENCHMARKS.md). Few fitting queries took up to
// 112 iterations to converge. Heads stopped here report mass_fit_converged = false.
inline constexpr int kMassFitMaxIterations = 6;

inline BoundedLsqOptions MassFitSolverOptions() {
  BoundedLsqOptions options;
  options.max_iterations = kMassFitMaxIterations;
  return options;
}

// The GPU backend's mass fit: the accelerated solver (no factorisation, no host round trip), for
// 200 t / n iterations within [50, 200] (n: distinct fitting queries): the fewer queries per
// weight, the worse conditioned the system and the more iterations it takes to come within 1% of
// the converged held-out error (bench/bench_lsq_caps, docs/BENCHMARKS.md: 50 are enough from
// n = 3.4t up, 100 at n = 2t, 200 at n = t and below).
inline constexpr int kMassFitAcceleratedMinIterations = 50;
inline constexpr int kMassFitAcceleratedMaxIterations = 200;
int MassFitAcceleratedIterations(int64_t t, int64_t distinct_queries);

inline AcceleratedLsqOptions MassFitAcceleratedOptions(int64_t t, int64_t distinct_queries) {
  AcceleratedLsqOptions options;
  options.max_iterations = MassFitAcceleratedIterations(t, distinct_queries);
  return options;
}

// Which solver the mass fit uses: the backend's own (the CPU backend projected Newton, the GPU
// backend the accelerated solver) or the one named (tests that compare the backends name one).
enum class MassFitSolver { kBackendDefault, kNewton, kAccelerated };

// The normal equations of the mass fit, G = Phi^T Phi and c = Phi^T m with Phi = exp(L - M),
// plus `prior` * mean(diag(G)) * ||w - 1||^2 (the pull toward selection's w = 1).
struct MassSystem {
  MatrixD gram;
  VectorD rhs;
};
MassSystem BuildMassSystem(const MatrixF& subset_logits, const VectorF& row_max, const VectorF& mass, double prior);

struct MassFitResult {
  VectorF beta;             // t
  BoundedLsqResult solver;  // w and convergence figures
  double solve_seconds = 0;  // of the bounded NNLS alone
};

// `subset_logits` = s * Q K_S^T + b_S (n x t), `row_max`/`mass` of the full block for the same queries.
// `prior` > 0 adds prior * mean(diag(G)) * ||w - 1||^2 to the objective (a pull toward w = 1, the
// selection's beta = b_S).
// `solver`: kBackendDefault is the Newton solver here; the accelerated one runs
// MassFitAcceleratedIterations(t, distinct_queries) iterations.
MassFitResult FitMass(const MatrixF& subset_logits, const VectorF& row_max, const VectorF& mass,
                      const VectorF& subset_bias, double w_lo, double w_hi, double prior = 0,
                      MassFitSolver solver = MassFitSolver::kBackendDefault, int64_t distinct_queries = 0);

// Row-wise softmax of logits.
MatrixF RowSoftmax(const MatrixF& logits);

// Ridge least squares C_v for design X (n x t) and targets Y (n x dv), pulled toward `prior`
// (t x dv; empty: toward 0).
MatrixF FitValues(const MatrixF& design, const MatrixF& targets, double ridge, const MatrixF* prior = nullptr);

}  // namespace kvcompact
