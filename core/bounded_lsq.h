// Bounded least squares  min_w ||A w - y||^2  s.t.  lo <= w <= hi,  given in normal-equation form
// (G = A^T A, c = A^T y), solved in float64 by a projected Newton method (Bertsekas 1982):
// Newton steps on the free variables, scaled gradient steps on the binding ones, an Armijo search
// along the projection arc. It iterates to the KKT conditions; it is not a clamp of the
// unconstrained solution.
#pragma once

#include "core/types.h"

namespace kvcompact {

struct BoundedLsqOptions {
  int max_iterations = 200;
  double tolerance = 1e-10;  // on the diagonally scaled projected gradient, relative to max(1, max|w|)
  // Start point (clamped to the bounds); null: the clamped unconstrained solution. OMP refits warm
  // start from the previous step's weights, which are usually a Newton step or two from optimal.
  const VectorD* warm_start = nullptr;
};

struct BoundedLsqResult {
  VectorD w;
  int iterations = 0;
  bool converged = false;
  double projected_gradient = 0;  // max |w - P(w - g)|, the KKT residual in the w units
};

BoundedLsqResult SolveBoundedLsq(const MatrixD& gram, const VectorD& rhs, double lo, double hi,
                                 const BoundedLsqOptions& options = {});

// The same problem by accelerated projected gradient (FISTA with gradient restart, O'Donoghue and
// Candes 2015) on the Jacobi-scaled system u = sqrt(diag G) w (G' rounded to fp32): no
// factorisation, one product G' y per iteration, so a device can run every head's problem in lockstep with no host round trip
// (kernels/device_lsq.h mirrors it step for step). Start w = 1 (plain selection), clamped; step
// 1 / L with L = 1.02 x the largest eigenvalue of G' by `power_iterations` (at least 1) of power
// iteration from the ones vector, at most t (>= trace G', which bounds it). Stops where the Newton solver would call it converged (the same scaled
// projected gradient, taken at the extrapolated point) or after max_iterations.
struct AcceleratedLsqOptions {
  int max_iterations = 200;
  double tolerance = 1e-8;
  // The Jacobi-scaled Gram matrix of positive features has a dominant Perron root: on the mass
  // fit's systems 8 steps gave the same iterates as 30 (bench_lsq_caps --power_iterations).
  int power_iterations = 10;
};

BoundedLsqResult SolveBoundedLsqAccelerated(const MatrixD& gram, const VectorD& rhs, double lo, double hi,
                                            const AcceleratedLsqOptions& options = {});

// max_j |w_j - clamp(w_j - g_j)| with g = G w - c: zero exactly at a KKT point.
double ProjectedGradientNorm(const MatrixD& gram, const VectorD& rhs, const VectorD& w, double lo,
                             double hi);

}  // namespace kvcompact
