// The batched bounded least-squares solver on the device against the CPU solver (core/bounded_lsq,
// itself checked against exhaustive float64 search in tests/core) on random problems: ragged sizes
// in one batch, bounds binding on both sides, a rank-deficient Gram matrix. Label: gpu.
#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "core/bounded_lsq.h"
#include "kernels/cuda_backend.h"
#include "kernels/device_lsq.h"

namespace kvcompact {
namespace {

struct Problem {
  MatrixD gram;
  VectorD rhs;
  double lo, hi;
};

// A = exp(N(0, spread)) (positive, like Phi), y = A w* + noise with w* partly outside [lo, hi].
Problem MakeProblem(int64_t n, int64_t t, double spread, uint64_t seed, bool duplicate_columns) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g(0, 1);
  MatrixD a(n, t);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < t; ++j) a(i, j) = std::exp(spread * g(rng));
  if (duplicate_columns && t >= 4) a.col(t - 1) = a.col(0), a.col(t - 2) = a.col(1);
  VectorD w_star(t);
  for (int64_t j = 0; j < t; ++j) w_star[j] = std::exp(2.5 * g(rng));
  VectorD y = a * w_star;
  for (int64_t i = 0; i < n; ++i) y[i] *= 1 + 0.3 * g(rng);
  return {a.transpose() * a, a.transpose() * y, std::exp(-3.0), std::exp(3.0)};
}

double Objective(const Problem& p, const VectorD& w) { return 0.5 * w.dot(p.gram * w) - p.rhs.dot(w); }

struct Device {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  Device() {
    cudaStreamCreate(&stream);
    cublasCreate(&blas);
    cublasSetStream(blas, stream);
    cusolverDnCreate(&solver);
    cusolverDnSetStream(solver, stream);
  }
  ~Device() {
    cusolverDnDestroy(solver);
    cublasDestroy(blas);
    cudaStreamDestroy(stream);
  }
};

// `accelerated`: the accelerated solver with these options; null: the Newton solver's defaults.
std::vector<VectorD> SolveOnDevice(const std::vector<Problem>& problems, std::vector<kernels::LsqOutcome>* outcomes,
                                   const AcceleratedLsqOptions* accelerated = nullptr,
                                   const std::vector<int>& caps = {}) {
  Device dev;
  kernels::DeviceBoundedLsq lsq(dev.blas, dev.stream, 3);  // fewer lanes than problems: lanes are reused
  EXPECT_TRUE(lsq.Init().ok());
  std::vector<kernels::LsqBounds> bounds;
  for (size_t i = 0; i < problems.size(); ++i) {
    bounds.push_back({problems[i].rhs.size(), problems[i].lo, problems[i].hi, caps.empty() ? 0 : caps[i]});
  }
  EXPECT_TRUE(lsq.Reset(bounds).ok());
  for (size_t i = 0; i < problems.size(); ++i) {
    const int64_t t = problems[i].rhs.size();
    cudaMemcpy(lsq.gram(i), problems[i].gram.data(), t * t * sizeof(double), cudaMemcpyHostToDevice);
    cudaMemcpy(lsq.rhs(i), problems[i].rhs.data(), t * sizeof(double), cudaMemcpyHostToDevice);
  }
  const absl::Status s = accelerated ? lsq.SolveAccelerated(*accelerated, outcomes, 7) : lsq.Solve({}, outcomes);
  EXPECT_TRUE(s.ok()) << s;
  std::vector<VectorD> out;
  for (size_t i = 0; i < problems.size(); ++i) {
    VectorD w(problems[i].rhs.size());
    cudaMemcpy(w.data(), lsq.weights(i), w.size() * sizeof(double), cudaMemcpyDeviceToHost);
    out.push_back(w);
  }
  return out;
}

#define SKIP_WITHOUT_GPU()                                                                      \
  do {                                                                                          \
    if (std::string why = kernels::CudaUnavailableReason(); !why.empty()) GTEST_SKIP() << why; \
  } while (0)

TEST(DeviceBoundedLsq, MatchesCpuSolverOnARaggedBatch) {
  SKIP_WITHOUT_GPU();
  std::vector<Problem> problems;
  uint64_t seed = 1;
  for (int64_t t : {1, 2, 7, 40, 129, 300, 700})
    for (double spread : {0.5, 1.5}) problems.push_back(MakeProblem(3 * t + 16, t, spread, ++seed, false));
  std::vector<kernels::LsqOutcome> outcomes;
  const std::vector<VectorD> gpu = SolveOnDevice(problems, &outcomes);
  ASSERT_EQ(gpu.size(), problems.size());
  int binding = 0;
  for (size_t i = 0; i < problems.size(); ++i) {
    const Problem& p = problems[i];
    const BoundedLsqResult cpu = SolveBoundedLsq(p.gram, p.rhs, p.lo, p.hi);
    const std::string where = "problem " + std::to_string(i) + " t=" + std::to_string(p.rhs.size());
    ASSERT_TRUE(cpu.converged) << where;
    EXPECT_TRUE(outcomes[i].converged) << where << " iterations " << outcomes[i].iterations;
    EXPECT_TRUE(gpu[i].allFinite()) << where;
    EXPECT_GE(gpu[i].minCoeff(), p.lo) << where;
    EXPECT_LE(gpu[i].maxCoeff(), p.hi) << where;
    // The same KKT point: the problems are strictly convex.
    EXPECT_LT((gpu[i] - cpu.w).cwiseAbs().maxCoeff(), 1e-6 * std::max(1.0, cpu.w.cwiseAbs().maxCoeff())) << where;
    const double scale = std::max(1.0, std::abs(Objective(p, cpu.w)));
    EXPECT_LE(Objective(p, gpu[i]), Objective(p, cpu.w) + 1e-9 * scale) << where;
    for (int64_t j = 0; j < cpu.w.size(); ++j) binding += cpu.w[j] == p.lo || cpu.w[j] == p.hi;
  }
  EXPECT_GT(binding, 10);  // the bounds were active, not only the unconstrained solve
}

TEST(DeviceBoundedLsq, RankDeficientGramReachesTheCpuObjective) {
  SKIP_WITHOUT_GPU();
  std::vector<Problem> problems = {MakeProblem(200, 60, 1.0, 11, true), MakeProblem(40, 80, 1.0, 12, false)};
  std::vector<kernels::LsqOutcome> outcomes;
  const std::vector<VectorD> gpu = SolveOnDevice(problems, &outcomes);
  for (size_t i = 0; i < problems.size(); ++i) {
    const Problem& p = problems[i];
    const BoundedLsqResult cpu = SolveBoundedLsq(p.gram, p.rhs, p.lo, p.hi);
    const double scale = std::max(1.0, std::abs(Objective(p, cpu.w)));
    EXPECT_NEAR(Objective(p, gpu[i]), Objective(p, cpu.w), 1e-7 * scale) << "problem " << i;
    EXPECT_LT(ProjectedGradientNorm(p.gram, p.rhs, gpu[i], p.lo, p.hi), 1e-6 * scale) << "problem " << i;
  }
}

TEST(DeviceBoundedLsq, EmptyBatchIsANoOp) {
  SKIP_WITHOUT_GPU();
  std::vector<kernels::LsqOutcome> outcomes;
  EXPECT_TRUE(SolveOnDevice({}, &outcomes).empty());
  EXPECT_TRUE(outcomes.empty());
}

// The accelerated solver on the device against the same solver on the CPU (core/bounded_lsq),
// step for step: a ragged batch, problems that converge early and ones that run to the bound.
TEST(DeviceBoundedLsq, AcceleratedMatchesCpuAcceleratedOnARaggedBatch) {
  SKIP_WITHOUT_GPU();
  std::vector<Problem> problems;
  uint64_t seed = 40;
  for (int64_t t : {1, 2, 7, 40, 129, 300, 700, 1500})
    for (double spread : {0.5, 1.5}) problems.push_back(MakeProblem(3 * t + 16, t, spread, ++seed, false));
  problems.push_back(MakeProblem(200, 60, 1.0, 11, true));  // rank-deficient
  AcceleratedLsqOptions options;
  options.max_iterations = 300;
  std::vector<int> caps;  // each problem its own bound (0: the options' 300), as the backend sets them
  for (size_t i = 0; i < problems.size(); ++i) caps.push_back(i % 3 == 0 ? 0 : 40 + 30 * static_cast<int>(i % 3));
  std::vector<kernels::LsqOutcome> outcomes;
  const std::vector<VectorD> gpu = SolveOnDevice(problems, &outcomes, &options, caps);
  ASSERT_EQ(gpu.size(), problems.size());
  int converged = 0, bounded = 0;
  for (size_t i = 0; i < problems.size(); ++i) {
    const Problem& p = problems[i];
    AcceleratedLsqOptions own = options;
    if (caps[i] > 0) own.max_iterations = caps[i];
    const BoundedLsqResult cpu = SolveBoundedLsqAccelerated(p.gram, p.rhs, p.lo, p.hi, own);
    if (!cpu.converged) {
      EXPECT_EQ(outcomes[i].iterations, own.max_iterations) << "problem " << i;
    }
    const BoundedLsqResult best = SolveBoundedLsq(p.gram, p.rhs, p.lo, p.hi);
    const std::string where = "problem " + std::to_string(i) + " t=" + std::to_string(p.rhs.size());
    EXPECT_TRUE(gpu[i].allFinite()) << where;
    EXPECT_GE(gpu[i].minCoeff(), p.lo) << where;
    EXPECT_LE(gpu[i].maxCoeff(), p.hi) << where;
    EXPECT_EQ(outcomes[i].converged, cpu.converged) << where;
    EXPECT_NEAR(outcomes[i].iterations, cpu.iterations, 2) << where;
    // The same iterates up to rounding: the same progress from w = 1 toward the optimum.
    const double start = Objective(p, VectorD::Ones(p.rhs.size()).cwiseMax(p.lo).cwiseMin(p.hi));
    const double span = std::max(start - Objective(p, best.w), 1e-300);
    EXPECT_NEAR(Objective(p, gpu[i]), Objective(p, cpu.w), 1e-6 * span) << where;
    converged += cpu.converged;
    bounded += !cpu.converged;
  }
  EXPECT_GT(converged, 0);
  EXPECT_GT(bounded, 0);
}

// A Gram matrix of zeros (no query reaches any kept key) ends the power iteration at its first
// product: the step falls back to 1 / t and every weight stays at w = 1, as on the CPU.
TEST(DeviceBoundedLsq, AcceleratedZeroSystemKeepsTheStart) {
  SKIP_WITHOUT_GPU();
  const Problem zero{MatrixD::Zero(5, 5), VectorD::Zero(5), std::exp(-3.0), std::exp(3.0)};
  AcceleratedLsqOptions options;
  options.max_iterations = 20;
  std::vector<kernels::LsqOutcome> outcomes;
  const std::vector<VectorD> gpu = SolveOnDevice({zero, MakeProblem(40, 7, 1.0, 77, false)}, &outcomes, &options);
  const BoundedLsqResult cpu = SolveBoundedLsqAccelerated(zero.gram, zero.rhs, zero.lo, zero.hi, options);
  ASSERT_EQ(gpu.size(), 2u);
  EXPECT_EQ(gpu[0], VectorD::Ones(5));
  EXPECT_EQ(cpu.w, VectorD::Ones(5));
  EXPECT_TRUE(gpu[1].allFinite());
}

}  // namespace
}  // namespace kvcompact
