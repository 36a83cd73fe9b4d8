#include "core/compact_head.h"

#include <algorithm>
#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "core/fit.h"
#include "core/layer.h"
#include "core/selection.h"
#include "core/synthetic.h"
#include "tests/core/brute_force.h"

namespace kvcompact {
namespace {

using testing::Md;
using testing::Vd;

struct Problem {
  MatrixF K, V, Q;
  VectorF b;
  float scale;
  BlockView view(bool with_bias = true) const {
    return BlockView{ConstMatrixMapF(K.data(), K.rows(), K.cols()),
                     ConstMatrixMapF(V.data(), V.rows(), V.cols()), with_bias ? b.data() : nullptr,
                     scale};
  }
};

Problem RandomProblem(uint64_t seed, int T, int n, int d, int dv, float bias_std) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  Problem p{MatrixF(T, d), MatrixF(T, dv), MatrixF(n, d), VectorF(T), 1.0f / std::sqrt(float(d))};
  for (int i = 0; i < p.K.size(); ++i) p.K.data()[i] = 1.5f * g(rng);
  for (int i = 0; i < p.V.size(); ++i) p.V.data()[i] = g(rng);
  for (int i = 0; i < p.Q.size(); ++i) p.Q.data()[i] = 1.5f * g(rng);
  for (int i = 0; i < T; ++i) p.b[i] = bias_std * g(rng);
  return p;
}

TEST(AttentionStats, MatchesFloat64BruteForceAcrossChunkSizes) {
  const Problem p = RandomProblem(11, 37, 50, 16, 8, 0.7f);
  const auto ref = testing::BruteAttention(p.K.cast<double>(), p.V.cast<double>(),
                                           p.b.cast<double>(), p.Q.cast<double>(), p.scale);
  for (int chunk : {1, 7, 16, 256}) {
    const AttentionStats st = ComputeAttentionStats(p.view(), p.Q, ScoreReduce::kRms, chunk);
    EXPECT_LT((st.row_max.cast<double>() - ref.row_max).cwiseAbs().maxCoeff(), 1e-5);
    EXPECT_LT(((st.mass.cast<double>() - ref.mass).array() / ref.mass.array()).abs().maxCoeff(), 1e-5);
    EXPECT_LT((st.outputs.cast<double>() - ref.outputs).norm() / ref.outputs.norm(), 1e-5);
    EXPECT_LT((st.scores.cast<double>() - ref.rms_scores).norm() / ref.rms_scores.norm(), 1e-5);
  }
}

// Every reduce against float64: max, mean, RMS, the argmax counts of coverage (an integer part
// plus half the RMS), and the rank unions of RMS with max and with coverage (against float64 ranks).
TEST(AttentionStats, EveryScoreReduceMatchesFloat64BruteForce) {
  const Problem p = RandomProblem(12, 41, 60, 16, 8, 0.7f);
  const auto ref = testing::BruteAttention(p.K.cast<double>(), p.V.cast<double>(),
                                           p.b.cast<double>(), p.Q.cast<double>(), p.scale);
  for (int chunk : {1, 7, 256}) {
    const VectorF max = ComputeAttentionStats(p.view(), p.Q, ScoreReduce::kMax, chunk).scores;
    EXPECT_LT((max.cast<double>() - ref.max_scores).cwiseAbs().maxCoeff(), 1e-6);
    const VectorF coverage = ComputeAttentionStats(p.view(), p.Q, ScoreReduce::kCoverage, chunk).scores;
    EXPECT_EQ(coverage.array().floor().cast<double>().matrix(), ref.top_count);
    EXPECT_GT(ref.top_count.maxCoeff(), 1.0);  // the counts are not all 0 or 1
    EXPECT_LT(((coverage.array() - coverage.array().floor()).cast<double>() - 0.5 * ref.rms_scores.array())
                  .abs().maxCoeff(), 1e-5);
    const VectorF rms = ref.rms_scores.cast<float>();
    const VectorF by_count = (ref.top_count + 0.5 * ref.rms_scores).cast<float>();
    for (const auto& [reduce, second] : {std::pair{ScoreReduce::kRmsMax, VectorF(ref.max_scores.cast<float>())},
                                         std::pair{ScoreReduce::kRmsCoverage, by_count}}) {
      const VectorF union_scores = ComputeAttentionStats(p.view(), p.Q, reduce, chunk).scores;
      for (int64_t t : {1, 2, 5, 20, 41}) {
        const std::vector<int32_t> first_t = TopK(rms, t), second_t = TopK(second, t);
        // Within the union of the two top-t lists, and holding both top-floor(t/2) lists.
        const std::vector<int32_t> got = TopK(union_scores, t);
        ASSERT_EQ(static_cast<int64_t>(got.size()), t);
        for (int32_t j : got) {
          EXPECT_TRUE(std::count(first_t.begin(), first_t.end(), j) || std::count(second_t.begin(), second_t.end(), j))
              << "reduce " << static_cast<int>(reduce) << " t=" << t << " key " << j;
        }
        for (const VectorF* s : {&rms, &second}) {
          for (int32_t j : TopK(*s, t / 2)) EXPECT_TRUE(std::count(got.begin(), got.end(), j)) << "t=" << t;
        }
      }
    }
  }
}

TEST(RankUnionScores, TakesTheTwoRankingsAlternately) {
  VectorF a(4), b(4);
  a << 0.9f, 0.1f, 0.5f, 0.2f;  // ranks 0, 3, 1, 2
  b << 0.1f, 0.8f, 0.2f, 0.7f;  // ranks 3, 0, 2, 1
  const VectorF s = RankUnionScores(a, b);
  EXPECT_EQ(TopK(s, 1), (std::vector<int32_t>{0}));  // equal best ranks: the earlier token first
  EXPECT_EQ(TopK(s, 2), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(TopK(s, 3), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(TopK(s, 4), (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(RankUnionScores(VectorF::Constant(1, 0.3f), VectorF::Constant(1, 0.0f)), VectorF::Constant(1, 1.0f));
  EXPECT_EQ(RankUnionScores(VectorF(), VectorF()).size(), 0);
}

// The CUDA backend gathers the held-out split itself from SplitQueryRows; it must be the split
// SplitQueries makes: disjoint, complete, ascending, floor(n f) held out (at least one row kept
// for fitting), the same rows for the same seed. Edges: n = 0, 1, 2, f = 0 and 1.
TEST(SplitQueries, HeldOutQueryCountAtTheEdges) {
  EXPECT_EQ(HeldOutQueryCount(0, 0.5), 0);
  EXPECT_EQ(HeldOutQueryCount(1, 0.9), 0);   // the one query is kept for fitting
  EXPECT_EQ(HeldOutQueryCount(2, 0.9), 1);
  EXPECT_EQ(HeldOutQueryCount(10, 0.0), 0);
  EXPECT_EQ(HeldOutQueryCount(10, 0.1), 1);
  EXPECT_EQ(HeldOutQueryCount(10, 0.25), 2);  // floor
  EXPECT_EQ(HeldOutQueryCount(10, 1.0), 9);
  EXPECT_EQ(HeldOutQueryCount(8192, 0.1), 819);
  EXPECT_EQ(HeldOutQueryCount(int64_t{1} << 40, 0.5), int64_t{1} << 39);
}

TEST(SplitQueries, RowsAreTheSplitOfSplitQueries) {
  std::mt19937 rng(5);
  std::normal_distribution<float> g;
  for (int64_t n : {0, 1, 2, 7, 100, 1000}) {
    for (double f : {0.0, 0.1, 0.5, 1.0}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " fraction " << f);
      MatrixF q(n, 3);
      for (Eigen::Index i = 0; i < q.size(); ++i) q.data()[i] = g(rng);
      std::vector<int32_t> fit_rows, eval_rows;
      SplitQueryRows(n, f, 42, &fit_rows, &eval_rows);
      const int64_t want_eval = std::clamp<int64_t>(static_cast<int64_t>(std::floor(n * f)), 0, std::max<int64_t>(n - 1, 0));
      ASSERT_EQ(static_cast<int64_t>(eval_rows.size()), want_eval);
      ASSERT_EQ(static_cast<int64_t>(fit_rows.size()), n - want_eval);
      std::vector<int32_t> all(fit_rows);
      all.insert(all.end(), eval_rows.begin(), eval_rows.end());
      std::sort(all.begin(), all.end());
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(all[i], i);
      EXPECT_TRUE(std::is_sorted(fit_rows.begin(), fit_rows.end()));
      EXPECT_TRUE(std::is_sorted(eval_rows.begin(), eval_rows.end()));
      MatrixF fit, eval;
      SplitQueries(q, f, 42, &fit, &eval);
      ASSERT_EQ(fit.rows(), static_cast<Eigen::Index>(fit_rows.size()));
      ASSERT_EQ(eval.rows(), static_cast<Eigen::Index>(eval_rows.size()));
      for (size_t r = 0; r < fit_rows.size(); ++r) EXPECT_EQ(fit.row(r), q.row(fit_rows[r]));
      for (size_t r = 0; r < eval_rows.size(); ++r) EXPECT_EQ(eval.row(r), q.row(eval_rows[r]));
      std::vector<int32_t> again_fit, again_eval;
      SplitQueryRows(n, f, 42, &again_fit, &again_eval);
      EXPECT_EQ(again_eval, eval_rows);
      if (n >= 100 && want_eval > 0 && want_eval < n - 1) {  // another seed, another subset (C(n, k) ways)
        SplitQueryRows(n, f, 43, &again_fit, &again_eval);
        EXPECT_NE(again_eval, eval_rows);
      }
    }
  }
}

TEST(FitValues, RidgeSolutionMatchesNormalEquations) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  MatrixF X(80, 12), Y(80, 6);
  for (int i = 0; i < X.size(); ++i) X.data()[i] = u(rng);
  for (int i = 0; i < Y.size(); ++i) Y.data()[i] = u(rng) - 0.5f;
  const double ridge = 1e-3;
  const MatrixF got = FitValues(X, Y, ridge);
  const Md Xd = X.cast<double>();
  Md G = Xd.transpose() * Xd;
  const double lambda = ridge * G.trace() / G.rows();
  G.diagonal().array() += lambda;
  const Md want = G.inverse() * (Xd.transpose() * Y.cast<double>());
  EXPECT_LT((got.cast<double>() - want).norm() / want.norm(), 1e-5);
  // The normal equations hold: (X^T X + lambda I) C - X^T Y = 0.
  const Md residual = G * got.cast<double>() - Xd.transpose() * Y.cast<double>();
  EXPECT_LT(residual.norm() / (Xd.transpose() * Y.cast<double>()).norm(), 1e-5);
}

TEST(FitValues, NearDuplicateKeysStayFiniteWithRidge) {
  MatrixF X(30, 4);
  X.setRandom();
  X = X.cwiseAbs();
  X.col(3) = X.col(2);
  MatrixF Y(30, 3);
  Y.setRandom();
  EXPECT_TRUE(FitValues(X, Y, 1e-5).allFinite());
}

// t = T through the fit path: w = 1 is the exact mass solution, so beta must equal b (the + b rule)
// and the refitted values must reproduce V, mass and outputs.
TEST(CompactHead, FullBudgetFitReproducesBlockAndCarriesBias) {
  const Problem p = RandomProblem(21, 24, 200, 8, 8, 1.0f);
  HeadOptions opt;
  opt.budget = 24;
  opt.force_fit = true;
  opt.holdout_fraction = 0.25;
  opt.ridge = 1e-9;
  StageSeconds s;
  auto head = CompactHead(p.view(), &p.Q, opt, &s);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_LT((head->beta - p.b).cwiseAbs().maxCoeff(), 2e-4);
  EXPECT_LT((head->values - p.V).norm() / p.V.norm(), 2e-3);
  EXPECT_LT(head->quality.output_rel_error, 1e-4);
  EXPECT_LT(head->quality.mass_rel_error, 1e-4);
}

TEST(CompactHead, BudgetAtLeastTokensReturnsBlockUnchanged) {
  const Problem p = RandomProblem(22, 30, 40, 8, 8, 0.5f);
  HeadOptions opt;
  opt.budget = 45;
  StageSeconds s;
  auto head = CompactHead(p.view(), &p.Q, opt, &s);
  ASSERT_TRUE(head.ok());
  ASSERT_EQ(head->indices.size(), 30u);
  EXPECT_EQ(head->keys, p.K);
  EXPECT_EQ(head->values, p.V);
  EXPECT_EQ(head->beta, p.b);
  EXPECT_LT(head->quality.output_rel_error, 1e-6);
}

// Compact once, then compact the result again at its own size: nothing may change.
TEST(CompactHead, RecompactingAtOwnSizeIsIdentity) {
  const Problem p = RandomProblem(23, 64, 120, 8, 8, 0.0f);
  HeadOptions opt;
  opt.budget = 16;
  StageSeconds s;
  auto first = CompactHead(p.view(false), &p.Q, opt, &s);
  ASSERT_TRUE(first.ok());
  const BlockView again{ConstMatrixMapF(first->keys.data(), 16, 8),
                        ConstMatrixMapF(first->values.data(), 16, 8), first->beta.data(), p.scale};
  auto second = CompactHead(again, &p.Q, opt, &s);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->keys, first->keys);
  EXPECT_EQ(second->beta, first->beta);
  EXPECT_EQ(second->values, first->values);
  // Through the fit path too: beta comes back as log(1) + b.
  opt.force_fit = true;
  opt.ridge = 1e-9;
  auto refit = CompactHead(again, &p.Q, opt, &s);
  ASSERT_TRUE(refit.ok());
  EXPECT_LT((refit->beta - first->beta).cwiseAbs().maxCoeff(), 2e-3);
}

// The whole AM pipeline against a float64 brute-force run of the same three steps.
// With the priors toward selection (n = 6 < t = 10: the queries leave directions unconstrained)
// and without them; the brute force adds the priors as extra rows of the least-squares systems.
TEST(CompactHead, AmMatchesFloat64BruteForcePipeline) {
  struct Case { uint64_t seed; int tokens, queries, t; double mass_prior, ridge; };
  for (const Case& c : std::vector<Case>{{31, 40, 96, 6, -1, 1e-6}, {32, 40, 96, 6, -1, 1e-6}, {33, 40, 96, 6, -1, 1e-6},
                                         {34, 40, 96, 6, 1e-3, 1e-2}, {35, 40, 6, 10, 1e-3, 1e-2},
                                         {36, 40, 6, 10, 1e-2, 1e-1}}) {
    const uint64_t seed = c.seed;
    const Problem p = RandomProblem(seed, c.tokens, c.queries, 8, 6, 0.3f);
    const int t = c.t;
    HeadOptions opt;
    opt.budget = t;
    opt.holdout_fraction = 0;
    opt.ridge = c.ridge;
    opt.mass_prior = c.mass_prior;
    StageSeconds s;
    auto head = CompactHead(p.view(), &p.Q, opt, &s);
    ASSERT_TRUE(head.ok());

    const Md K = p.K.cast<double>(), V = p.V.cast<double>(), Q = p.Q.cast<double>();
    const Vd b = p.b.cast<double>();
    const auto ref = testing::BruteAttention(K, V, b, Q, p.scale);
    std::vector<int> order(c.tokens);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int a, int c) { return ref.rms_scores[a] > ref.rms_scores[c]; });
    std::vector<int> S(order.begin(), order.begin() + t);
    std::sort(S.begin(), S.end());
    ASSERT_EQ(std::vector<int>(head->indices.begin(), head->indices.end()), S) << "seed " << seed;

    Md phi(Q.rows(), t);
    for (int i = 0; i < Q.rows(); ++i)
      for (int a = 0; a < t; ++a)
        phi(i, a) = std::exp(p.scale * Q.row(i).dot(K.row(S[a])) + b[S[a]] - ref.row_max[i]);
    Md phi_aug = phi;
    Vd m_aug = ref.mass;
    if (c.mass_prior > 0) {  // + prior * mean(diag(Phi^T Phi)) * ||w - 1||^2
      const double lambda = c.mass_prior * (phi.transpose() * phi).trace() / t;
      phi_aug.conservativeResize(phi.rows() + t, t);
      phi_aug.bottomRows(t) = std::sqrt(lambda) * Md::Identity(t, t);
      m_aug.conservativeResize(phi.rows() + t);
      m_aug.tail(t).setConstant(std::sqrt(lambda));
    }
    const Vd w = testing::BruteBoundedLsq(phi_aug, m_aug, std::exp(-3.0), std::exp(3.0));
    Vd beta(t);
    for (int a = 0; a < t; ++a) beta[a] = std::log(w[a]) + b[S[a]];
    EXPECT_LT((head->beta.cast<double>() - beta).cwiseAbs().maxCoeff(), 1e-3) << "seed " << seed;

    Md X(Q.rows(), t);
    for (int i = 0; i < Q.rows(); ++i) {
      for (int a = 0; a < t; ++a) X(i, a) = std::exp(p.scale * Q.row(i).dot(K.row(S[a])) + beta[a]);
      X.row(i) /= X.row(i).sum();
    }
    Md G = X.transpose() * X;
    const double lambda = c.ridge * G.trace() / t;
    G.diagonal().array() += lambda;
    Md VS(t, V.cols());
    for (int a = 0; a < t; ++a) VS.row(a) = V.row(S[a]);
    const Md Cv = G.ldlt().solve(X.transpose() * ref.outputs + lambda * VS);  // ridge toward V[S]
    EXPECT_LT((head->values.cast<double>() - Cv).norm() / Cv.norm(), 5e-3) << "seed " << seed;
  }
}

// Never worse than selection on held-out queries: where the fit loses (few queries, no priors),
// the head is the selection with that one's figures; where it wins, the fit is kept. Over random
// problems the returned held-out error is never above the selection's.
TEST(CompactHead, KeepsPlainSelectionWhereTheFitDoesWorseOnHeldOutQueries) {
  int kept = 0, fitted = 0;
  for (uint64_t seed = 60; seed < 80; ++seed) {
    const bool few = seed % 2 == 0;
    const Problem p = RandomProblem(seed, 96, few ? 24 : 400, 8, 6, 0.5f);
    HeadOptions opt;
    opt.budget = 32;
    opt.holdout_fraction = 0.5;
    opt.seed = seed;
    if (few) {  // 12 fitting queries for 32 keys and no priors: an overfit fit
      opt.mass_prior = -1;
      opt.ridge = 1e-9;
    }
    StageSeconds s;
    auto head = CompactHead(p.view(), &p.Q, opt, &s);
    ASSERT_TRUE(head.ok());
    // The selection of the same keys, measured on the same held-out queries.
    MatrixF fit_q, eval_q;
    SplitQueries(p.Q, opt.holdout_fraction, opt.seed, &fit_q, &eval_q);
    CompactedHead selection;
    selection.indices = head->indices;
    selection.keys = head->keys;
    selection.beta.resize(32);
    selection.values.resize(32, 6);
    for (int a = 0; a < 32; ++a) {
      selection.beta[a] = p.b[head->indices[a]];
      selection.values.row(a) = p.V.row(head->indices[a]);
    }
    const AttentionStats truth = ComputeAttentionStats(p.view(), eval_q, std::nullopt, 256);
    float sel_err = 0, sel_mass = 0;
    MeasureErrors(selection, eval_q, truth, p.scale, &sel_err, &sel_mass);
    EXPECT_LE(head->quality.output_rel_error, sel_err * (1 + 1e-6f)) << "seed " << seed;
    if (head->selection_kept) {
      ++kept;
      EXPECT_EQ(head->beta, selection.beta);
      EXPECT_EQ(head->values, selection.values);
      EXPECT_FLOAT_EQ(head->quality.output_rel_error, sel_err);
    } else {
      ++fitted;
      EXPECT_LT(head->quality.output_rel_error, sel_err);
    }
  }
  EXPECT_GT(kept, 0) << "the overfit cases lose to selection";
  EXPECT_GT(fitted, 0) << "with enough queries the fit wins";
}

// Few or repeated fitting queries (n <= t, near-duplicates): the pipeline's held-out error is no
// worse than that of a float64 run of the same objective (the priors included) on the same keys.
TEST(CompactHead, FewOrRepeatedQueriesMatchAFloat64ReferenceOnHeldOutQueries) {
  struct Case { uint64_t seed; int n_fit, distinct; };
  for (const Case& c : std::vector<Case>{{71, 4, 0}, {72, 6, 0}, {73, 10, 0}, {74, 12, 3}, {75, 16, 2}, {76, 8, 0}}) {
    const int T = 40, t = 10, n_eval = 30;
    Problem p = RandomProblem(c.seed, T, c.n_fit + n_eval, 8, 6, 0.3f);
    std::mt19937_64 rng(c.seed);
    std::normal_distribution<float> noise(0.f, 1e-3f);
    if (c.distinct > 0) {
      for (int i = 0; i < c.n_fit; ++i)
        for (int k = 0; k < 8; ++k) p.Q(i, k) = p.Q(i % c.distinct, k) + noise(rng);
    }
    // Fit on the first n_fit queries, hold out the rest: CompactHead with holdout_fraction = 0 on
    // the fitting rows, errors measured here on the held-out rows for both runs.
    const MatrixF fit_q = p.Q.topRows(c.n_fit), eval_q = p.Q.bottomRows(n_eval);
    HeadOptions opt;
    opt.budget = t;
    opt.holdout_fraction = 0;
    StageSeconds s;
    auto head = CompactHead(p.view(), &fit_q, opt, &s);
    ASSERT_TRUE(head.ok());
    const std::vector<int> S(head->indices.begin(), head->indices.end());
    // float64: the same keys, the same priors, solved exactly.
    const Md K = p.K.cast<double>(), V = p.V.cast<double>(), Qf = fit_q.cast<double>();
    const Vd b = p.b.cast<double>();
    const auto ref = testing::BruteAttention(K, V, b, Qf, p.scale);
    const int64_t distinct = DistinctQueryCount(fit_q);
    const double mu_rel = MassPrior(opt, t, distinct), ridge = ValueRidge(opt, t, distinct);
    Md phi(c.n_fit, t);
    for (int i = 0; i < c.n_fit; ++i)
      for (int a = 0; a < t; ++a) phi(i, a) = std::exp(p.scale * Qf.row(i).dot(K.row(S[a])) + b[S[a]] - ref.row_max[i]);
    const double mu = mu_rel * (phi.transpose() * phi).trace() / t;
    Md phi_aug(c.n_fit + t, t);
    phi_aug << phi, std::sqrt(mu) * Md::Identity(t, t);
    Vd m_aug(c.n_fit + t);
    m_aug << ref.mass, Vd::Constant(t, std::sqrt(mu));
    const Vd w = testing::BruteBoundedLsq(phi_aug, m_aug, std::exp(-3.0), std::exp(3.0));
    CompactedHead exact;
    exact.indices = head->indices;
    exact.keys = head->keys;
    exact.beta.resize(t);
    for (int a = 0; a < t; ++a) exact.beta[a] = static_cast<float>(std::log(w[a]) + b[S[a]]);
    Md X(c.n_fit, t), VS(t, V.cols());
    for (int i = 0; i < c.n_fit; ++i) {
      for (int a = 0; a < t; ++a) X(i, a) = std::exp(p.scale * Qf.row(i).dot(K.row(S[a])) + exact.beta[a]);
      X.row(i) /= X.row(i).sum();
    }
    for (int a = 0; a < t; ++a) VS.row(a) = V.row(S[a]);
    Md G = X.transpose() * X;
    const double lambda = ridge * G.trace() / t;
    G.diagonal().array() += lambda;
    exact.values = G.ldlt().solve(X.transpose() * ref.outputs + lambda * VS).cast<float>();
    const AttentionStats truth = ComputeAttentionStats(p.view(), eval_q, std::nullopt, 256);
    float got = 0, want = 0, unused = 0;
    MeasureErrors(*head, eval_q, truth, p.scale, &got, &unused);
    MeasureErrors(exact, eval_q, truth, p.scale, &want, &unused);
    EXPECT_LE(got, want * 1.02f + 1e-4f) << "seed " << c.seed << " n_fit " << c.n_fit << " distinct " << c.distinct;
  }
}

TEST(DistinctQueryCount, CountsNearDuplicatesOnce) {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> g(0.f, 1.f), noise(0.f, 1e-4f);
  MatrixF distinct(300, 64);
  for (int i = 0; i < distinct.size(); ++i) distinct.data()[i] = g(rng);
  EXPECT_GE(DistinctQueryCount(distinct), 295) << "independent queries are (nearly) all distinct";
  MatrixF repeated(600, 64);
  for (int i = 0; i < 600; ++i) {
    for (int c = 0; c < 64; ++c) repeated(i, c) = distinct(i % 8, c) + noise(rng);
  }
  EXPECT_LE(DistinctQueryCount(repeated), 8 * 16) << "8 queries repeated with noise";
  EXPECT_GE(DistinctQueryCount(repeated), 8);
  EXPECT_EQ(DistinctQueryCount(MatrixF::Constant(50, 64, 0.3f)), 1);
  EXPECT_EQ(DistinctQueryCount(MatrixF(0, 64)), 0);
}

TEST(CompactHead, BaselinesCopyKeysBiasAndValues) {
  const Problem p = RandomProblem(41, 50, 60, 8, 8, 0.4f);
  for (Method m : {Method::kH2O, Method::kSnapKV, Method::kTruncateRecent, Method::kStreamingLlm,
                   Method::kRandom}) {
    HeadOptions opt;
    opt.method = m;
    opt.budget = 10;
    StageSeconds s;
    auto head = CompactHead(p.view(), &p.Q, opt, &s);
    ASSERT_TRUE(head.ok()) << GetMethodSpec(m).name;
    ASSERT_EQ(head->indices.size(), 10u);
    ASSERT_TRUE(std::is_sorted(head->indices.begin(), head->indices.end()));
    ASSERT_EQ(std::adjacent_find(head->indices.begin(), head->indices.end()), head->indices.end());
    for (int a = 0; a < 10; ++a) {
      const int j = head->indices[a];
      EXPECT_EQ(head->keys.row(a), p.K.row(j));
      EXPECT_EQ(head->values.row(a), p.V.row(j));
      EXPECT_EQ(head->beta[a], p.b[j]);
    }
    if (m == Method::kTruncateRecent) {
      EXPECT_EQ(head->indices.front(), 40);
    }
    if (m == Method::kStreamingLlm) {
      EXPECT_EQ(head->indices[3], 3);
      EXPECT_EQ(head->indices[4], 44);
    }
  }
}

TEST(CompactHead, QueryFreeMethodsRunWithoutQueriesOthersRefuse) {
  const Problem p = RandomProblem(42, 50, 60, 8, 8, 0.f);
  HeadOptions opt;
  opt.budget = 10;
  StageSeconds s;
  opt.method = Method::kTruncateRecent;
  auto recent = CompactHead(p.view(), nullptr, opt, &s);
  ASSERT_TRUE(recent.ok());
  EXPECT_FALSE(recent->quality.has_quality);
  opt.method = Method::kAmHighestAttention;
  auto am = CompactHead(p.view(), nullptr, opt, &s);
  EXPECT_EQ(am.status().code(), absl::StatusCode::kInvalidArgument);
  opt.budget = 0;
  EXPECT_EQ(CompactHead(p.view(), &p.Q, opt, &s).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The reason the service exists: at 20x, refitting beta and values beats copying them.
TEST(CompactHead, AmHeldOutErrorBelowEvictionBaselinesOnSyntheticHeads) {
  SyntheticShape shape;
  shape.heads = 3;
  shape.tokens = 1024;
  shape.queries = 512;
  const LayerData data = MakeSyntheticLayer(shape, 7);
  for (int64_t h = 0; h < shape.heads; ++h) {
    const MatrixF q = data.HeadQueries(h);
    float err[3];
    const Method methods[3] = {Method::kAmHighestAttention, Method::kH2O, Method::kSnapKV};
    for (int i = 0; i < 3; ++i) {
      HeadOptions opt;
      opt.method = methods[i];
      opt.budget = shape.tokens / 20;
      StageSeconds s;
      auto head = CompactHead(data.HeadBlock(h), &q, opt, &s);
      ASSERT_TRUE(head.ok());
      err[i] = head->quality.output_rel_error;
    }
    EXPECT_LT(err[0], 0.8f * err[1]) << "head " << h << " am " << err[0] << " h2o " << err[1];
    EXPECT_LT(err[0], 0.8f * err[2]) << "head " << h << " am " << err[0] << " snapkv " << err[2];
  }
}

// With fewer fitting queries than keys the mass fit's bounded NNLS can need 100+ Newton steps; it
// stops at kMassFitMaxIterations, says so, and returns finite weights (how close they stay to the
// converged ones is bench_lsq_caps's measurement).
TEST(CompactHead, MassFitStopsAtItsIterationBoundAndSaysSo) {
  SyntheticShape shape;
  shape.heads = 4;
  shape.tokens = 2048;
  shape.queries = 160;  // 144 fitting queries for t = 256
  const LayerData data = MakeSyntheticLayer(shape, 31);
  int stopped = 0;
  for (int64_t h = 0; h < shape.heads; ++h) {
    const MatrixF q = data.HeadQueries(h);
    HeadOptions opt;
    opt.budget = 256;
    StageSeconds s;
    auto head = CompactHead(data.HeadBlock(h), &q, opt, &s);
    ASSERT_TRUE(head.ok());
    EXPECT_LE(head->mass_fit_iterations, kMassFitMaxIterations);
    if (!head->mass_fit_converged) {
      ++stopped;
      EXPECT_EQ(head->mass_fit_iterations, kMassFitMaxIterations);
    }
    EXPECT_TRUE(head->beta.allFinite());
    EXPECT_TRUE(head->values.allFinite());
  }
  // The case exists: at least one head needed more than the bound.
  EXPECT_GT(stopped, 0);
}

// A layer split into head slices gives the same heads as the whole layer (the CUDA backend splits
// layers that do not fit its memory bound); the random method and the query split depend on seeds.
TEST(SliceHeads, SlicesCompactToTheSameHeadsAsTheWholeLayer) {
  SyntheticShape shape;
  shape.heads = 5;
  shape.tokens = 300;
  shape.queries = 64;
  LayerJob job;
  job.data = MakeSyntheticLayer(shape, 9);
  job.data.layer = 3;
  job.data.bias.assign(shape.heads * shape.tokens, 0.f);
  for (size_t i = 0; i < job.data.bias.size(); ++i) job.data.bias[i] = 0.01f * static_cast<float>(i % 17);
  job.budgets = {10, 20, 30, 40, 50};
  auto cpu = MakeCpuBackend(2);
  for (Method m : {Method::kRandom, Method::kAmHighestAttention}) {
    job.options.method = m;
    job.options.holdout_fraction = 0.25f;
    auto whole = cpu->CompactLayer(job);
    ASSERT_TRUE(whole.ok());
    size_t next = 0;
    for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, 2}, {2, 3}, {3, 5}}) {
      const LayerJob slice = SliceHeads(job, begin, end);
      EXPECT_EQ(slice.data.heads, end - begin);
      EXPECT_EQ(slice.first_head, begin);
      auto part = cpu->CompactLayer(slice);
      ASSERT_TRUE(part.ok());
      for (const CompactedHead& head : part->heads) {
        const CompactedHead& ref = whole->heads[next++];
        EXPECT_EQ(head.indices, ref.indices) << "head " << next - 1;
        EXPECT_EQ(head.beta, ref.beta) << "head " << next - 1;
        EXPECT_EQ(head.values, ref.values) << "head " << next - 1;
        EXPECT_EQ(head.quality.output_rel_error, ref.quality.output_rel_error);
      }
    }
    EXPECT_EQ(next, whole->heads.size());
  }
}

}  // namespace
}  // namespace kvcompact
