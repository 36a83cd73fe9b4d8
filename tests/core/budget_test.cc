// Budgets across heads: exact totals, caps, and the marginal-gain split against exhaustive search.
#include "core/budget.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include <gtest/gtest.h>

#include "tests/core/synthetic_job.h"

namespace kvcompact {
namespace {

int64_t Sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

TEST(RatioBudget, RoundsWithinOneAndTAcrossTheRange) {
  EXPECT_EQ(RatioBudget(60000, 50), 1200);
  EXPECT_EQ(RatioBudget(1074, 20), 54);          // 53.7 rounds up
  EXPECT_EQ(RatioBudget(100, 40), 3);            // 2.5 rounds half away from zero
  EXPECT_EQ(RatioBudget(100, 1e9), 1);           // never below one key
  EXPECT_EQ(RatioBudget(100, 1), 100);           // equal
  EXPECT_EQ(RatioBudget(100, 0.5), 100);         // a ratio below one keeps everything
  EXPECT_EQ(RatioBudget(100, 4.9e-324), 100);    // denormal: T / ratio is infinite
  EXPECT_EQ(RatioBudget(100, 0.0), 100);
  EXPECT_EQ(RatioBudget(100, std::nan("")), 100);
  EXPECT_EQ(RatioBudget(0, 20), 0);
  EXPECT_EQ(RatioBudget(1, 20), 1);
  const int64_t big = (int64_t{1} << 31) - 1;
  EXPECT_EQ(RatioBudget(big, 2), (big + 1) / 2);  // 2^30 - 0.5 rounds up
  EXPECT_EQ(KeptKeys(1200, 60000), 1200);
  EXPECT_EQ(KeptKeys(70000, 60000), 60000);
  EXPECT_EQ(KeptKeys(60000, 60000), 60000);
}

TEST(WaterFill, ProportionalWithoutCapsAndExcessRedistributed) {
  auto t = WaterFill({1, 2, 3, 4}, {1000, 1000, 1000, 1000}, 100);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t, (std::vector<int64_t>{10, 20, 30, 40}));
  // The first head is capped at 5; its excess goes to the others in proportion to their shares.
  t = WaterFill({10, 1, 1}, {5, 100, 100}, 25);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t, (std::vector<int64_t>{5, 10, 10}));
  // Zero shares still keep one entry.
  t = WaterFill({0, 1}, {100, 100}, 10);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t, (std::vector<int64_t>{1, 9}));
}

TEST(WaterFill, RefusesImpossibleTotals) {
  EXPECT_FALSE(WaterFill({1, 1}, {3, 3}, 7).ok());   // above the caps
  EXPECT_FALSE(WaterFill({1, 1, 1}, {3, 3, 3}, 2).ok());  // below one per head
  EXPECT_FALSE(WaterFill({1, -1}, {3, 3}, 4).ok());
}

TEST(WaterFill, RandomCasesMeetTotalsCapsAndOrder) {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 40);
    std::vector<double> shares(n);
    std::vector<int64_t> caps(n);
    for (int h = 0; h < n; ++h) {
      shares[h] = std::exp(std::normal_distribution<double>(0, 2)(rng));
      caps[h] = 1 + static_cast<int64_t>(rng() % 500);
    }
    const int64_t room = Sum(caps);
    const int64_t total = n + static_cast<int64_t>(rng() % (room - n + 1));
    auto t = WaterFill(shares, caps, total);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(Sum(*t), total);
    for (int a = 0; a < n; ++a) {
      EXPECT_GE((*t)[a], 1);
      EXPECT_LE((*t)[a], caps[a]);
      for (int b = 0; b < n; ++b) {
        // A larger share never gets fewer entries, unless its cap stops it (rounding: one entry).
        if (shares[a] > shares[b] && (*t)[a] < caps[a]) {
          EXPECT_GE((*t)[a] + 1, (*t)[b]);
        }
      }
    }
  }
}

TEST(PyramidShares, FirstLayerGetsSpreadTimesTheLast) {
  const std::vector<double> s = PyramidShares(4, 2, 3.0);
  ASSERT_EQ(s.size(), 8u);
  EXPECT_DOUBLE_EQ(s[0], 3.0);
  EXPECT_DOUBLE_EQ(s[1], 3.0);
  EXPECT_DOUBLE_EQ(s[6], 1.0);
  EXPECT_GT(s[2], s[4]);
}

TEST(TopKAcrossHeads, CountsTheHighestScoresPerHead) {
  std::vector<VectorF> scores(3, VectorF(10));
  for (int j = 0; j < 10; ++j) {
    scores[0][j] = 10.f + j;   // every score of head 0 beats the others
    scores[1][j] = 1.f + 0.1f * j;
    scores[2][j] = 0.01f * j;
  }
  auto t = TopKAcrossHeads(scores, {10, 10, 10}, 14);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(Sum(*t), 14);
  EXPECT_EQ((*t)[0], 10);
  EXPECT_EQ((*t)[1], 3);  // the 4 remaining go to head 1, less the one head 2 must keep
  EXPECT_EQ((*t)[2], 1);
}

// Piecewise-linear error of a convex curve at t (curve points ascending, t within them).
double Interpolate(const ErrorCurve& c, int64_t t) {
  for (size_t i = 1; i < c.size(); ++i) {
    if (t <= c[i].first) {
      const double f = double(t - c[i - 1].first) / double(c[i].first - c[i - 1].first);
      return c[i - 1].second + f * (c[i].second - c[i - 1].second);
    }
  }
  return c.back().second;
}

TEST(AllocateByMarginalGain, MatchesExhaustiveSearchOnConvexCurves) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<ErrorCurve> curves(3);
    for (auto& c : curves) {
      // Convex, decreasing: e(t) = a / t^p sampled at 2, 4, 8, 16, 32.
      const double a = std::uniform_real_distribution<double>(0.1, 2)(rng);
      const double p = std::uniform_real_distribution<double>(0.3, 1.5)(rng);
      for (int64_t b : {2, 4, 8, 16, 32}) c.push_back({b, a / std::pow(double(b), p)});
    }
    const int64_t total = 6 + static_cast<int64_t>(rng() % 91);  // within [sum of starts, sum of ends]
    auto t = AllocateByMarginalGain(curves, {32, 32, 32}, total);
    ASSERT_TRUE(t.ok());
    EXPECT_EQ(Sum(*t), total);
    double got = 0;
    for (int h = 0; h < 3; ++h) got += Interpolate(curves[h], (*t)[h]);
    double best = 1e300;
    for (int64_t a = 2; a <= 32; ++a) {
      for (int64_t b = 2; b <= 32; ++b) {
        const int64_t c = total - a - b;
        if (c < 2 || c > 32) continue;
        best = std::min(best, Interpolate(curves[0], a) + Interpolate(curves[1], b) + Interpolate(curves[2], c));
      }
    }
    EXPECT_LE(got, best + 1e-12) << "trial " << trial;
  }
}

TEST(AllocateByMarginalGain, NonConvexAndFlatCurvesStillMeetTheTotal) {
  std::vector<ErrorCurve> curves = {{{1, 0.5}, {2, 0.5}, {4, 0.6}, {8, 0.1}},  // noisy, non-monotone
                                    {{1, 0.2}, {2, 0.2}, {4, 0.2}, {8, 0.2}}};  // flat
  auto t = AllocateByMarginalGain(curves, {100, 100}, 60);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(Sum(*t), 60);
  EXPECT_GE((*t)[0], 8);  // the only head that gains anything gets its whole curve first
}

// The per-request sensitivity split on a layer whose heads differ in how concentrated their
// attention is: the total is kept, and the error summed over heads is no worse than uniform's.
TEST(AllocateLayer, SensitivityKeepsTheTotalAndDoesNoWorseThanUniform) {
  LayerJob job = testing::SyntheticJob(4, 600, 400, 30, 31);
  const float temps[4] = {3.0f, 1.0f, 0.5f, 0.2f};  // sharp to flat attention
  const int64_t per_head = job.data.queries * job.data.head_dim;
  for (int64_t h = 0; h < 4; ++h) {
    for (int64_t i = 0; i < per_head; ++i) job.data.query_data[h * per_head + i] *= temps[h];
  }
  job.options.holdout_fraction = 0.25;
  auto cpu = MakeCpuBackend(2);
  auto uniform = cpu->CompactLayer(job);
  ASSERT_TRUE(uniform.ok());
  LayerAllocation rule;
  rule.kind = LayerAllocation::Kind::kSensitivity;
  rule.probe_queries = 200;
  ASSERT_TRUE(AllocateLayer(*cpu, &job, rule).ok());
  EXPECT_EQ(Sum(job.budgets), 120);
  EXPECT_NE(job.budgets, std::vector<int64_t>(4, 30));
  auto split = cpu->CompactLayer(job);
  ASSERT_TRUE(split.ok());
  double e_uniform = 0, e_split = 0;
  for (int64_t h = 0; h < 4; ++h) {
    e_uniform += uniform->heads[h].quality.output_rel_error;
    e_split += split->heads[h].quality.output_rel_error;
    EXPECT_EQ(split->heads[h].indices.size(), static_cast<size_t>(job.budgets[h]));
  }
  EXPECT_LE(e_split, e_uniform) << "uniform " << e_uniform << " sensitivity " << e_split;
}

TEST(AllocateLayer, GlobalTopKKeepsTheTotalWithinCaps) {
  LayerJob job = testing::SyntheticJob(3, 400, 128, 100, 32);
  auto cpu = MakeCpuBackend(1);
  LayerAllocation rule;
  rule.kind = LayerAllocation::Kind::kGlobalTopK;
  rule.head_cap = 0.5;
  ASSERT_TRUE(AllocateLayer(*cpu, &job, rule).ok());
  EXPECT_EQ(Sum(job.budgets), 300);
  for (int64_t t : job.budgets) EXPECT_LE(t, 200);
  job.budgets.assign(3, 250);  // 750 > 3 x 200: refused, not clipped silently
  EXPECT_FALSE(AllocateLayer(*cpu, &job, rule).ok());
}

}  // namespace
}  // namespace kvcompact
