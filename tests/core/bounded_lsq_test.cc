#include "core/bounded_lsq.h"

#include <random>

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace kvcompact
