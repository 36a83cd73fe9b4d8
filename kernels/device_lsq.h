// Bounded least squares  min_w ||A w - y||^2, lo <= w <= hi  for a batch of problems on the
// device: the projected Newton method of core/bounded_lsq.h (the same start, binding set, Armijo
// search along the projection arc and tolerance), in fp64, every problem of the batch advanced
// together. The free-set Newton systems, packed to the free variables only (most bind at high
// ratios, and the factorisation costs the cube of the order), are solved by cuSOLVER Cholesky;
// where one is not positive definite the step falls back to the scaled gradient (the CPU solver
// tries LDLT there), so on rank-deficient problems the two may stop at different minimisers of
// the same objective.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "core/bounded_lsq.h"
#include "kernels/device_buffer.h"
#include "kernels/device_lsq_kernels.cuh"

namespace kvcompact::kernels {

struct LsqBounds {
  int64_t t = 0;
  double lo = 0, hi = 0;
  int max_iterations = 0;  // the accelerated solver's bound for this problem; 0: the options'
};

struct LsqOutcome {
  int iterations = 0;
  bool converged = false;
};

class DeviceBoundedLsq {
 public:
  // Work is ordered on `stream`; the per-problem Cholesky factorisations fan out over `lanes`
  // streams of their own (one cuSOLVER handle each), since one factorisation of a few thousand
  // unknowns leaves most of the GPU idle.
  DeviceBoundedLsq(cublasHandle_t blas, cudaStream_t stream, int lanes = 8) : blas_(blas), stream_(stream), lanes_(lanes) {}
  ~DeviceBoundedLsq();
  DeviceBoundedLsq(const DeviceBoundedLsq&) = delete;
  DeviceBoundedLsq& operator=(const DeviceBoundedLsq&) = delete;
  absl::Status Init();

  // Device bytes a batch of these sizes needs (two t x t matrices and a few vectors each).
  static size_t BytesFor(const std::vector<int64_t>& sizes);

  // Lays out a batch; then fill gram(i) (t x t) and rhs(i) (t) on the stream before Solve.
  absl::Status Reset(const std::vector<LsqBounds>& problems);
  double* gram(int i) const { return host_problems_[i].gram; }
  double* rhs(int i) const { return host_problems_[i].vec + kLsqRhs * host_problems_[i].t; }
  // Solution of problem i (device, t long) after Solve.
  const double* weights(int i) const { return host_problems_[i].vec + kLsqW * host_problems_[i].t; }

  absl::Status Solve(const BoundedLsqOptions& options, std::vector<LsqOutcome>* outcomes);
  // The accelerated solver (core SolveBoundedLsqAccelerated): every problem's iterations in
  // lockstep, two launches per iteration and no factorisation, each problem up to its own
  // LsqBounds::max_iterations (0: options.max_iterations); the host reads the states only every
  // `check_every` iterations, to stop launching once none is active.
  absl::Status SolveAccelerated(const AcceleratedLsqOptions& options, std::vector<LsqOutcome>* outcomes,
                                int check_every = 50);
  void Release() {
    arena_.Release();
    for (auto& lane : lane_) lane->work.Release();
  }

 private:
  // Cholesky factorisation and solve of every listed problem's system, of order `orders[i]` for
  // problem i, against its kLsqSol vector.
  absl::Status FactorAndSolve(const std::vector<int>& which, const std::vector<int>& orders);
  absl::Status ReadStates();

  struct Lane {
    cudaStream_t stream = nullptr;
    cusolverDnHandle_t solver = nullptr;
    cudaEvent_t done = nullptr;
    DeviceBuffer<double> work;
  };
  cublasHandle_t blas_;
  cudaStream_t stream_;
  int lanes_;
  std::vector<std::unique_ptr<Lane>> lane_;
  cudaEvent_t ready_ = nullptr;
  std::vector<LsqProblem> host_problems_;
  std::vector<LsqState> host_states_;
  int64_t t_max_ = 0;
  DeviceBuffer<double> arena_;
  DeviceBuffer<LsqProblem> problems_;
  DeviceBuffer<LsqState> states_;
  DeviceBuffer<int> info_, solve_info_;
};

}  // namespace kvcompact::kernels
