// Kernels of the batched bounded least-squares solver on the device (kernels/device_lsq.h): one
// thread block per problem for the vector work, a 2-D grid for the t x t Newton systems. fp64.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvcompact::kernels {

// Per-problem vectors, each `t` long, stored one after the other at LsqProblem::vec.
// kLsqPos: where a free variable sits in the compacted Newton system (its rank among the free ones).
enum LsqVector : int {
  kLsqRhs, kLsqW, kLsqGrad, kLsqDir, kLsqTrial, kLsqGt, kLsqInvDiag, kLsqSol, kLsqFree, kLsqPos, kLsqVectors
};

struct LsqProblem {
  int64_t t = 0;
  double* gram = nullptr;    // t x t, symmetric (G = A^T A)
  double* system = nullptr;  // t x t scratch: the Newton system of the free variables, nfree x nfree packed
  double* vec = nullptr;     // kLsqVectors x t
  double lo = 0, hi = 0;
  int max_iterations = 0;    // the accelerated solver's bound for this problem
};

// kLsqStopped: the accelerated solver reached the problem's max_iterations.
enum LsqStatus : int { kLsqActive = 0, kLsqConverged = 1, kLsqStopped = 2 };

struct LsqState {
  double jitter = 0, f0 = 0, alpha = 1, lipschitz = 1;
  int nfree = 0, status = kLsqActive, searching = 0, moved = 0;
  int iterations = 0;      // the accelerated solver's steps taken
  int power_stopped = 0;   // a zero product ended its power iteration (the CPU solver's break)
};

// inv_diag, lipschitz; the unconstrained start (every variable free): system = G + 1e-12 (tr G / t) I,
// sol = c.
void LsqPrepare(const LsqProblem* problems, LsqState* states, int count, int64_t t_max, cudaStream_t stream);
// w = clamp(sol) if the start's Cholesky succeeded (info == 0) and is finite, else clamp(1).
void LsqStart(const LsqProblem* problems, const int* info, int count, cudaStream_t stream);
// From grad = G w - c: the KKT residual pg, convergence against `tolerance`, the epsilon-binding
// set, each free variable's position among the free ones, the free-set right-hand side packed
// (sol[pos_j] = -grad_j), f(w), alpha = 1.
void LsqAnalyze(const LsqProblem* problems, LsqState* states, int count, double tolerance, cudaStream_t stream);
// system = G on the free set (+ jitter on its diagonal), packed as an nfree x nfree matrix: the
// Newton systems shrink as variables bind (most do at high ratios); active problems only.
void LsqBuildSystem(const LsqProblem* problems, const LsqState* states, int count, int64_t t_max, cudaStream_t stream);
// dir = Newton step on the free set (sol[pos_j], if its Cholesky succeeded and is finite),
// -grad / diag(G) elsewhere.
void LsqDirection(const LsqProblem* problems, const LsqState* states, const int* info, int count, cudaStream_t stream);
// trial = clamp(w + alpha dir) for problems still searching.
void LsqTrial(const LsqProblem* problems, const LsqState* states, int count, cudaStream_t stream);
// Armijo test of the trial (gt = G trial): accept it into w, or halve alpha.
void LsqAccept(const LsqProblem* problems, LsqState* states, int count, cudaStream_t stream);
// For active problems that did not move: one projected-gradient step w = clamp(w - grad / L).
void LsqGradientStep(const LsqProblem* problems, const LsqState* states, int count, cudaStream_t stream);

// The accelerated solver (core SolveBoundedLsqAccelerated, step for step), on the Jacobi-scaled
// system u = s w with s = sqrt(diag G). Its vectors reuse the slots: kLsqInvDiag holds s, kLsqSol
// c' = c / s, kLsqW x, kLsqTrial the extrapolated point y, kLsqDir the power iterate and then the
// projected step, kLsqGt the product G' y; alpha is the momentum, lipschitz the step's L.
// s, c', x = y = clamp(s) (w = 1), the power iterate = 1; every problem active.
void AccPrepare(const LsqProblem* problems, LsqState* states, int count, cudaStream_t stream);
// system = G / (s s^T), the unit-diagonal matrix the iterations multiply by.
void AccScale(const LsqProblem* problems, int count, int64_t t_max, cudaStream_t stream);
// vec[out] = system vec[in], for active problems (a warp per row).
void AccProduct(const LsqProblem* problems, const LsqState* states, int count, int64_t t_max, int in, int out,
                cudaStream_t stream);
// One power-iteration step from kLsqGt = G' v: v = Gt / |Gt|; the last sets L = 1.02 |G' v|.
void AccPowerStep(const LsqProblem* problems, LsqState* states, int count, bool first, bool last, cudaStream_t stream);
// One FISTA step from kLsqGt = G' y: the projected step, the convergence test at y, restart or momentum.
void AccStep(const LsqProblem* problems, LsqState* states, int count, double tolerance, cudaStream_t stream);
// w = clamp(x / s) into kLsqW.
void AccFinish(const LsqProblem* problems, int count, cudaStream_t stream);

// out[i] = double(in[i]).
void CastToDouble(const float* in, int64_t count, double* out, cudaStream_t stream);

}  // namespace kvcompact::kernels
