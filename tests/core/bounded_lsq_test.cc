#include "core/bounded_lsq.h"

#include <random>

#include <gtest/gtest.h>

#include "core/fit.h"
#include "tests/core/brute_force.h"

namespace kvcompact {
namespace {

// A random attention-like design: non-negative columns, right-hand side from w in and out of bounds.
void MakeProblem(std::mt19937_64& rng, int n, int t, MatrixD* A, VectorD* y) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::normal_distribution<double> g(0.0, 1.0);
  *A = MatrixD(n, t);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < t; ++j) (*A)(i, j) = std::exp(2.0 * g(rng) - 2.0);
  VectorD w_true(t);
  for (int j = 0; j < t; ++j) w_true[j] = std::exp(4.0 * (u(rng) - 0.5) * 2.0);  // some outside [e^-3, e^3]
  *y = *A * w_true;
  for (int i = 0; i < n; ++i) (*y)[i] *= 1.0 + 0.1 * g(rng);
}

TEST(BoundedLsq, MatchesExhaustiveSearchOnSmallProblems) {
  std::mt19937_64 rng(1);
  const double lo = std::exp(-3.0), hi = std::exp(3.0);
  for (int trial = 0; trial < 30; ++trial) {
    const int t = 1 + trial % 6;
    MatrixD A;
    VectorD y;
    MakeProblem(rng, 20, t, &A, &y);
    const MatrixD G = A.transpose() * A;
    const VectorD c = A.transpose() * y;
    const BoundedLsqResult got = SolveBoundedLsq(G, c, lo, hi);
    const VectorD want = testing::BruteBoundedLsq(A, y, lo, hi);
    EXPECT_TRUE(got.converged) << "trial " << trial;
    const double obj_got = (A * got.w - y).squaredNorm();
    const double obj_want = (A * want - y).squaredNorm();
    EXPECT_LE(obj_got, obj_want * (1 + 1e-9) + 1e-12) << "trial " << trial;
    EXPECT_LT((got.w - want).cwiseAbs().maxCoeff(), 1e-6 * hi) << "trial " << trial;
  }
}

TEST(BoundedLsq, SatisfiesKktConditionsOnLargerProblems) {
  std::mt19937_64 rng(2);
  const double lo = 1e-12, hi = std::exp(7.0);
  for (int trial = 0; trial < 10; ++trial) {
    MatrixD A;
    VectorD y;
    MakeProblem(rng, 400, 120, &A, &y);
    const MatrixD G = A.transpose() * A;
    const VectorD c = A.transpose() * y;
    const BoundedLsqResult r = SolveBoundedLsq(G, c, lo, hi);
    ASSERT_TRUE(r.converged) << "trial " << trial << " iterations " << r.iterations;
    const VectorD grad = G * r.w - c;
    const double gscale = c.cwiseAbs().maxCoeff();
    int active = 0;
    for (int j = 0; j < r.w.size(); ++j) {
      ASSERT_GE(r.w[j], lo);
      ASSERT_LE(r.w[j], hi);
      // KKT: zero gradient where free, gradient pushing outward where at a bound.
      if (r.w[j] > lo && r.w[j] < hi) {
        EXPECT_NEAR(grad[j] / gscale, 0.0, 1e-7) << "free " << j;
      } else if (r.w[j] == lo) {
        EXPECT_GE(grad[j] / gscale, -1e-7);
        ++active;
      } else {
        EXPECT_LE(grad[j] / gscale, 1e-7);
        ++active;
      }
    }
    EXPECT_GT(active, 0) << "the problem should exercise the bounds";
  }
}

TEST(BoundedLsq, BeatsClampOfUnconstrainedSolution) {
  std::mt19937_64 rng(3);
  const double lo = std::exp(-3.0), hi = std::exp(3.0);
  int strictly_better = 0;
  for (int trial = 0; trial < 20; ++trial) {
    MatrixD A;
    VectorD y;
    MakeProblem(rng, 60, 12, &A, &y);
    const VectorD clamped = A.colPivHouseholderQr().solve(y).cwiseMax(lo).cwiseMin(hi);
    const VectorD w = SolveBoundedLsq(A.transpose() * A, A.transpose() * y, lo, hi).w;
    const double clamp_obj = (A * clamped - y).squaredNorm();
    const double obj = (A * w - y).squaredNorm();
    EXPECT_LE(obj, clamp_obj * (1 + 1e-12));
    if (obj < clamp_obj * (1 - 1e-6)) ++strictly_better;
  }
  EXPECT_GT(strictly_better, 0);
}

TEST(BoundedLsq, RankDeficientGramStaysFinite) {
  MatrixD A(10, 3);
  A.setRandom();
  A = A.cwiseAbs();
  A.col(2) = A.col(1);  // duplicate key
  const VectorD y = A * VectorD::Constant(3, 2.0);
  const BoundedLsqResult r = SolveBoundedLsq(A.transpose() * A, A.transpose() * y, 0.1, 10.0);
  ASSERT_TRUE(r.w.allFinite());
  EXPECT_LT((A * r.w - y).norm() / y.norm(), 1e-8);
}

// The accelerated solver (the device's algorithm) reaches the same minimum: against exhaustive
// search on small problems, against the Newton solver on larger ones, within bounds throughout.
TEST(BoundedLsqAccelerated, MatchesExhaustiveSearchOnSmallProblems) {
  std::mt19937_64 rng(11);
  const double lo = std::exp(-3.0), hi = std::exp(3.0);
  AcceleratedLsqOptions options;
  options.max_iterations = 20000;
  options.tolerance = 1e-11;
  for (int trial = 0; trial < 30; ++trial) {
    const int t = 1 + trial % 6;
    MatrixD A;
    VectorD y;
    MakeProblem(rng, 20, t, &A, &y);
    const BoundedLsqResult got = SolveBoundedLsqAccelerated(A.transpose() * A, A.transpose() * y, lo, hi, options);
    const VectorD want = testing::BruteBoundedLsq(A, y, lo, hi);
    const double obj_got = (A * got.w - y).squaredNorm(), obj_want = (A * want - y).squaredNorm();
    EXPECT_LE(obj_got, obj_want * (1 + 1e-7) + 1e-12) << "trial " << trial << " iterations " << got.iterations;
    EXPECT_GE(got.w.minCoeff(), lo);
    EXPECT_LE(got.w.maxCoeff(), hi);
  }
}

TEST(BoundedLsqAccelerated, ReachesTheNewtonObjectiveOnLargerProblems) {
  std::mt19937_64 rng(12);
  const double lo = std::exp(-3.0), hi = std::exp(3.0);
  for (int trial = 0; trial < 6; ++trial) {
    MatrixD A;
    VectorD y;
    MakeProblem(rng, 400, 120, &A, &y);
    const MatrixD G = A.transpose() * A;
    const VectorD c = A.transpose() * y;
    const double best = (A * SolveBoundedLsq(G, c, lo, hi).w - y).squaredNorm();
    const double start = (A * VectorD::Ones(120) - y).squaredNorm();
    AcceleratedLsqOptions options;
    options.max_iterations = 3000;
    const BoundedLsqResult r = SolveBoundedLsqAccelerated(G, c, lo, hi, options);
    const double got = (A * r.w - y).squaredNorm();
    // Of the way from the start (w = 1) to the optimum, all but 1e-6.
    EXPECT_LE(got - best, 1e-6 * (start - best)) << "trial " << trial << " iterations " << r.iterations;
    options.max_iterations = 200;  // the default: most of the way
    const double early = (A * SolveBoundedLsqAccelerated(G, c, lo, hi, options).w - y).squaredNorm();
    EXPECT_LE(early - best, 1e-2 * (start - best)) << "trial " << trial;
  }
}

TEST(BoundedLsqAccelerated, MassFitIterationsFollowQueriesPerWeight) {
  EXPECT_EQ(MassFitAcceleratedIterations(1200, 7373), 50);  // BENCH-A: n = 6.1 t
  EXPECT_EQ(MassFitAcceleratedIterations(1200, 2400), 100);
  EXPECT_EQ(MassFitAcceleratedIterations(1200, 1200), 200);
  EXPECT_EQ(MassFitAcceleratedIterations(1200, 300), 200);
  EXPECT_EQ(MassFitAcceleratedIterations(1200, 0), 200);
  EXPECT_EQ(MassFitAcceleratedIterations(1, int64_t{1} << 62), 50);
  EXPECT_EQ(MassFitAcceleratedIterations(int64_t{1} << 40, 1), 200);
}

TEST(BoundedLsqAccelerated, EdgeSizesAndRankDeficiency) {
  EXPECT_TRUE(SolveBoundedLsqAccelerated(MatrixD(0, 0), VectorD(0), 0.1, 10.0).converged);
  MatrixD A(10, 3);
  A.setRandom();
  A = A.cwiseAbs();
  A.col(2) = A.col(1);  // duplicate key
  const VectorD y = A * VectorD::Constant(3, 2.0);
  AcceleratedLsqOptions options;
  options.max_iterations = 5000;
  const BoundedLsqResult r = SolveBoundedLsqAccelerated(A.transpose() * A, A.transpose() * y, 0.1, 10.0, options);
  ASSERT_TRUE(r.w.allFinite());
  EXPECT_LT((A * r.w - y).norm() / y.norm(), 1e-6);
  // A zero column (a key no query reaches): its weight stays where it started, within bounds.
  A.col(0).setZero();
  const BoundedLsqResult z = SolveBoundedLsqAccelerated(A.transpose() * A, A.transpose() * y, 0.1, 10.0, options);
  ASSERT_TRUE(z.w.allFinite());
  EXPECT_GE(z.w.minCoeff(), 0.1);
  // No query reaches any key: the start, w = 1, is the answer.
  EXPECT_EQ(SolveBoundedLsqAccelerated(MatrixD::Zero(4, 4), VectorD::Zero(4), 0.1, 10.0).w, VectorD::Ones(4));
}

}  // namespace
}  // namespace kvcompact
