// OMP key selection: the Gram-space greedy loop against a float64 brute-force OMP that works on the
// n x T mass features directly (residual, correlations, exhaustive bounded refits).
#include "core/omp.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <set>

#include <gtest/gtest.h>

#include "core/bounded_lsq.h"
#include "core/compact_head.h"
#include "core/synthetic.h"
#include "tests/core/brute_force.h"

namespace kvcompact {
namespace {

using testing::Md;
using testing::Vd;

struct MassSystem {
  Md phi;  // n x T, exp(L - M) in float64
  Vd mass;
};

MassSystem RandomMassSystem(uint64_t seed, int T, int n, int d) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g(0.0, 1.0);
  Md K(T, d), Q(n, d), V = Md::Zero(T, 1);
  for (int i = 0; i < K.size(); ++i) K.data()[i] = 1.5 * g(rng);
  for (int i = 0; i < Q.size(); ++i) Q.data()[i] = 1.5 * g(rng);
  const double s = 1.0 / std::sqrt(double(d));
  const testing::BruteStats st = testing::BruteAttention(K, V, Vd::Zero(T), Q, s);
  MassSystem sys{Md(n, T), st.mass};
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < T; ++j) sys.phi(i, j) = std::exp(s * Q.row(i).dot(K.row(j)) - st.row_max[i]);
  }
  return sys;
}

// Textbook OMP in the residual form: r = m - Phi_S w, correlations Phi^T r, k best per step, an
// exact (exhaustive) bounded refit every `interval` steps; new keys carry w = lo until then.
std::vector<int32_t> BruteOmp(const MassSystem& sys, int t, int k, int interval, double lo, double hi, Vd* w_out) {
  const int T = sys.phi.cols();
  std::vector<int32_t> S;
  Vd w(0);
  int steps = 0;
  while (static_cast<int>(S.size()) < t) {
    Md phi_s(sys.phi.rows(), S.size());
    for (size_t a = 0; a < S.size(); ++a) phi_s.col(a) = sys.phi.col(S[a]);
    const Vd r = sys.mass - phi_s * w;
    Vd corr = sys.phi.transpose() * r;
    for (int32_t j : S) corr[j] = -std::numeric_limits<double>::infinity();
    const int add = std::min<int>(k, t - static_cast<int>(S.size()));
    for (int i = 0; i < add; ++i) {
      Eigen::Index best;
      corr.maxCoeff(&best);
      S.push_back(static_cast<int32_t>(best));
      corr[best] = -std::numeric_limits<double>::infinity();
      w.conservativeResize(w.size() + 1);
      w[w.size() - 1] = lo;
    }
    if (++steps % interval == 0 || static_cast<int>(S.size()) == t) {
      Md a(sys.phi.rows(), S.size());
      for (size_t j = 0; j < S.size(); ++j) a.col(j) = sys.phi.col(S[j]);
      w = testing::BruteBoundedLsq(a, sys.mass, lo, hi);
    }
  }
  (void)T;
  *w_out = w;
  return S;
}

// ||Phi_S w - m||^2 at the exact bounded optimum w for the selected keys S.
double ExactObjective(const MassSystem& sys, const std::vector<int32_t>& selected, double lo, double hi) {
  Md a(sys.phi.rows(), selected.size());
  for (size_t j = 0; j < selected.size(); ++j) a.col(j) = sys.phi.col(selected[j]);
  const Vd w = SolveBoundedLsq(a.transpose() * a, a.transpose() * sys.mass, lo, hi).w;
  return (a * w - sys.mass).squaredNorm();
}

OmpResult GramOmp(const MassSystem& sys, OmpParams p) {
  const MatrixD gram = sys.phi.transpose() * sys.phi;
  const VectorD rhs = sys.phi.transpose() * sys.mass;
  return SelectOmp(gram, rhs, p);
}

TEST(Omp, MatchesFloat64BruteForceOneKeyPerStep) {
  for (uint64_t seed : {1, 2, 3}) {
    const MassSystem sys = RandomMassSystem(seed, 48, 80, 8);
    OmpParams p;
    p.budget = 6;
    p.exact_refits = true;
    p.w_lo = std::exp(-3.0);
    p.w_hi = std::exp(3.0);
    p.drop_rounds = 0;
    const OmpResult got = GramOmp(sys, p);
    Vd w_ref;
    const std::vector<int32_t> want = BruteOmp(sys, 6, 1, 1, p.w_lo, p.w_hi, &w_ref);
    EXPECT_EQ(got.selected, want) << "seed " << seed;
    ASSERT_EQ(got.w.size(), w_ref.size());
    EXPECT_LT((got.w - w_ref).cwiseAbs().maxCoeff(), 1e-6 * std::max(1.0, w_ref.cwiseAbs().maxCoeff()));
    EXPECT_EQ(got.steps, 6);
    EXPECT_EQ(got.refits, 6);
  }
}

TEST(Omp, MatchesFloat64BruteForceSeveralKeysPerStepWithRefitInterval) {
  for (uint64_t seed : {4, 5}) {
    const MassSystem sys = RandomMassSystem(seed, 60, 90, 8);
    OmpParams p;
    p.budget = 7;  // steps of 2, 2, 2, 1: refits after steps 2 and 4 (the last)
    p.exact_refits = true;
    p.keys_per_step = 2;
    p.refit_interval = 2;
    p.w_lo = 1e-6;
    p.w_hi = std::exp(5.0);
    p.drop_rounds = 0;
    const OmpResult got = GramOmp(sys, p);
    Vd w_ref;
    const std::vector<int32_t> want = BruteOmp(sys, 7, 2, 2, p.w_lo, p.w_hi, &w_ref);
    EXPECT_EQ(got.selected, want) << "seed " << seed;
    EXPECT_LT((got.w - w_ref).cwiseAbs().maxCoeff(), 1e-6 * std::max(1.0, w_ref.cwiseAbs().maxCoeff()));
    EXPECT_EQ(got.steps, 4);
    EXPECT_EQ(got.refits, 2);
  }
}

TEST(Omp, DropsNegligibleKeysAndStillMeetsTheBudget) {
  const MassSystem sys = RandomMassSystem(6, 64, 96, 8);
  OmpParams p;
  p.budget = 8;
  p.drop_rounds = 0;
  p.exact_refits = true;
  const OmpResult plain = GramOmp(sys, p);
  // A threshold at the median weight forces the drop-and-continue rounds.
  std::vector<double> logs;
  for (Eigen::Index a = 0; a < plain.w.size(); ++a) logs.push_back(std::log(plain.w[a]));
  std::nth_element(logs.begin(), logs.begin() + logs.size() / 2, logs.end());
  p.drop_log_weight = logs[logs.size() / 2];
  p.drop_rounds = 3;
  p.exact_refits = true;
  const OmpResult got = GramOmp(sys, p);
  EXPECT_GT(got.dropped, 0);
  ASSERT_EQ(got.selected.size(), 8u);
  std::vector<int32_t> sorted = got.selected;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << "a key selected twice";
  // The final weights are the exact bounded least-squares optimum of the final set.
  Md a(sys.phi.rows(), got.selected.size());
  for (size_t j = 0; j < got.selected.size(); ++j) a.col(j) = sys.phi.col(got.selected[j]);
  const Vd w_ref = testing::BruteBoundedLsq(a, sys.mass, p.w_lo, p.w_hi);
  EXPECT_LT((got.w - w_ref).cwiseAbs().maxCoeff(), 1e-6 * std::max(1.0, w_ref.cwiseAbs().maxCoeff()));
}

// Refits that clamp the unconstrained solution (the default) select sets whose exact mass
// objective stays within a few per cent of textbook OMP's (exact bounded refits every step).
TEST(Omp, ClampedIntermediateRefitsStayCloseToExactOnes) {
  for (uint64_t seed : {31, 32, 33}) {
    const MassSystem sys = RandomMassSystem(seed, 300, 200, 16);
    OmpParams p;
    p.budget = 20;
    p.w_lo = std::exp(-3.0);
    p.w_hi = std::exp(3.0);  // tight bounds: the unconstrained solution often leaves the box
    const OmpResult fast = GramOmp(sys, p);
    p.exact_refits = true;
    const OmpResult exact = GramOmp(sys, p);
    EXPECT_LE(ExactObjective(sys, fast.selected, p.w_lo, p.w_hi), 1.05 * ExactObjective(sys, exact.selected, p.w_lo, p.w_hi))
        << "seed " << seed;
    EXPECT_EQ(fast.selected.size(), 20u);
  }
}

TEST(Omp, ProgressiveScheduleTakesFewerStepsAndKeepsTheBudget) {
  const MassSystem sys = RandomMassSystem(7, 200, 120, 8);
  OmpParams p;
  p.budget = 40;
  p.drop_rounds = 0;
  const OmpResult plain = GramOmp(sys, p);
  p.progressive = 0.25;
  const OmpResult fast = GramOmp(sys, p);
  EXPECT_EQ(plain.selected.size(), 40u);
  EXPECT_EQ(fast.selected.size(), 40u);
  EXPECT_EQ(plain.steps, 40);
  EXPECT_LT(fast.steps, 20);
}

TEST(Omp, BudgetLargerThanPoolSelectsEveryCandidate) {
  const MassSystem sys = RandomMassSystem(8, 12, 30, 4);
  OmpParams p;
  p.budget = 20;
  const OmpResult got = GramOmp(sys, p);
  EXPECT_EQ(got.selected.size(), 12u);
}

// Through the whole pipeline: OMP's held-out mass error beats highest-attention AM's at the same
// budget on synthetic heads (OMP optimises the mass fit over the choice of keys).
TEST(Omp, CompactHeadOmpHasLowerMassErrorThanHighestAttention) {
  SyntheticShape shape;
  shape.heads = 3;
  shape.tokens = 512;
  shape.queries = 384;
  const LayerData data = MakeSyntheticLayer(shape, 11);
  double err_am = 0, err_omp = 0, err_fast = 0, mass_am = 0, mass_omp = 0;
  for (int64_t h = 0; h < shape.heads; ++h) {
    const MatrixF q = data.HeadQueries(h);
    auto run = [&](Method m) {
      HeadOptions opt;
      opt.method = m;
      opt.budget = shape.tokens / 20;
      StageSeconds s;
      auto head = CompactHead(data.HeadBlock(h), &q, opt, &s);
      EXPECT_TRUE(head.ok());
      EXPECT_EQ(head->indices.size(), static_cast<size_t>(opt.budget));
      EXPECT_TRUE(std::is_sorted(head->indices.begin(), head->indices.end()));
      return head->quality;
    };
    const HeadQuality am = run(Method::kAmHighestAttention), omp = run(Method::kAmOmp),
                      fast = run(Method::kAmOmpFast);
    err_am += am.output_rel_error, err_omp += omp.output_rel_error, err_fast += fast.output_rel_error;
    mass_am += am.mass_rel_error, mass_omp += omp.mass_rel_error;
  }
  // Held-out mass error: OMP optimises the mass fit over the choice of keys. (Output errors are
  // within a few per cent of each other on these synthetic heads; real-model figures: QUALITY.md.)
  EXPECT_LT(mass_omp, mass_am);
  EXPECT_LT(err_omp, 1.1 * err_am);
  EXPECT_LT(err_fast, 1.1 * err_am);
}

// The greedy selection's mass objective beats keeping the keys of highest attention mass, both
// with exact bounded refits, on random systems.
TEST(Omp, MassObjectiveBelowTopAttentionSelection) {
  for (uint64_t seed : {21, 22, 23}) {
    const MassSystem sys = RandomMassSystem(seed, 300, 200, 16);
    OmpParams p;
    p.budget = 15;
    const OmpResult omp = GramOmp(sys, p);
    const Vd share = sys.phi.colwise().sum();  // attention mass per key
    std::vector<int32_t> top(share.size());
    std::iota(top.begin(), top.end(), 0);
    std::partial_sort(top.begin(), top.begin() + 15, top.end(), [&](int a, int b) { return share[a] > share[b]; });
    top.resize(15);
    EXPECT_LT(ExactObjective(sys, omp.selected, p.w_lo, p.w_hi), 0.9 * ExactObjective(sys, top, p.w_lo, p.w_hi))
        << "seed " << seed;
  }
}

// An OmpGram over a host matrix that records what the loop reads: a backend may keep G where it
// built it only because the loop never reads a row of a key it has not selected.
class RecordingGram : public OmpGram {
 public:
  explicit RecordingGram(const MatrixD& g) : g_(g) {}
  int64_t size() const override { return g_.rows(); }
  double MeanDiagonal() override { return g_.diagonal().mean(); }
  void Accumulate(const std::vector<int32_t>& cols, const VectorD& w, VectorD* into) override {
    EXPECT_EQ(static_cast<int64_t>(cols.size()), w.size());
    for (size_t a = 0; a < cols.size(); ++a) {
      read.insert(cols[a]);
      *into += g_.col(cols[a]) * w[a];
    }
  }
  MatrixD Block(const std::vector<int32_t>& rows, const std::vector<int32_t>& cols) override {
    MatrixD out(rows.size(), cols.size());
    for (size_t r = 0; r < rows.size(); ++r) {
      read.insert(rows[r]);
      for (size_t c = 0; c < cols.size(); ++c) {
        read.insert(cols[c]);
        out(r, c) = g_(rows[r], cols[c]);
      }
    }
    return out;
  }
  std::set<int32_t> read;

 private:
  const MatrixD& g_;
};

TEST(Omp, ReadsOnlyTheSelectedKeysOfTheGramAndMatchesTheHostMatrix) {
  int dropped = 0;
  for (uint64_t seed : {4, 5, 6}) {
    const MassSystem sys = RandomMassSystem(seed, 120, 160, 8);
    const MatrixD gram = sys.phi.transpose() * sys.phi;
    const VectorD rhs = sys.phi.transpose() * sys.mass;
    for (double progressive : {0.0, 0.1}) {
      OmpParams p;
      p.budget = 24;
      p.keys_per_step = 2;
      p.progressive = progressive;
      // A drop threshold at the median weight: keys dropped and replaced, their rows read too.
      p.drop_rounds = 0;
      const VectorD plain = SelectOmp(gram, rhs, p).w;
      std::vector<double> logs(plain.size());
      for (Eigen::Index a = 0; a < plain.size(); ++a) logs[a] = std::log(plain[a]);
      std::nth_element(logs.begin(), logs.begin() + logs.size() / 2, logs.end());
      p.drop_log_weight = logs[logs.size() / 2];
      p.drop_rounds = 3;
      RecordingGram recording(gram);
      const OmpResult lazy = SelectOmp(recording, rhs, p);
      const OmpResult host = SelectOmp(gram, rhs, p);
      EXPECT_EQ(lazy.selected, host.selected);
      EXPECT_LT((lazy.w - host.w).cwiseAbs().maxCoeff(), 1e-9 * host.w.cwiseAbs().maxCoeff());
      // Every row read belongs to a key that was selected at some point (kept or dropped).
      EXPECT_EQ(static_cast<int64_t>(recording.read.size()), p.budget + lazy.dropped) << "seed " << seed;
      for (int32_t j : lazy.selected) EXPECT_TRUE(recording.read.count(j));
      dropped += lazy.dropped;
    }
  }
  EXPECT_GT(dropped, 0);  // the drop rule ran: rows of dropped keys are the other reads allowed
}

TEST(Omp, PoolSizeDefaultsAndClamps) {
  EXPECT_EQ(OmpPoolSize(0, 10, 100000), 2048);
  EXPECT_EQ(OmpPoolSize(0, 1200, 60000), 12000);
  EXPECT_EQ(OmpPoolSize(0, 100, 1000), 1000);
  EXPECT_EQ(OmpPoolSize(50, 100, 1000), 100);      // never below t
  EXPECT_EQ(OmpPoolSize(5000, 100, 1000), 1000);   // never above T
  VectorF scores(10);
  scores << 0, 9, 1, 8, 2, 7, 3, 6, 4, 5;
  EXPECT_EQ(OmpCandidates(scores, 10, 2, 4), (std::vector<int32_t>{1, 3, 5, 7}));  // top 4, ascending
  EXPECT_EQ(OmpCandidates(scores, 10, 2, 0).size(), 10u);                            // the default covers T
  OmpResult r;
  r.selected = {3, 0, 2};
  EXPECT_EQ(SelectedPositions(r, {1, 3, 5, 7}), (std::vector<int32_t>{1, 5, 7}));
}

}  // namespace
}  // namespace kvcompact
