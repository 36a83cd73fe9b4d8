#include "core/omp.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <Eigen/Cholesky>

#include "core/bounded_lsq.h"

namespace kvcompact {
namespace {

// A host matrix as the loop reads it: MatrixD, or a map of an fp32 matrix; entries are read as
// float64. G is symmetric: its rows (contiguous, row-major) stand for its columns.
template <typename Matrix>
class HostOmpGram : public OmpGram {
 public:
  explicit HostOmpGram(const Matrix& g) : g_(g) {}
  int64_t size() const override { return g_.rows(); }
  double MeanDiagonal() override {
    return g_.rows() > 0 ? static_cast<double>(g_.diagonal().template cast<double>().mean()) : 0.0;
  }
  void Accumulate(const std::vector<int32_t>& cols, const VectorD& w, VectorD* into) override {
    for (size_t a = 0; a < cols.size(); ++a) *into += g_.row(cols[a]).transpose().template cast<double>() * w[a];
  }
  MatrixD Block(const std::vector<int32_t>& rows, const std::vector<int32_t>& cols) override {
    MatrixD out(rows.size(), cols.size());
    for (size_t r = 0; r < rows.size(); ++r) {
      const auto row = g_.row(rows[r]);
      for (size_t c = 0; c < cols.size(); ++c) out(r, c) = row[cols[c]];
    }
    return out;
  }

 private:
  const Matrix& g_;
};

struct OmpState {
  OmpState(OmpGram& g, const VectorD& c) : gram(g), rhs(c), taken(c.size(), 0), fitted(VectorD::Zero(c.size())) {}
  OmpGram& gram;
  const VectorD& rhs;
  std::vector<int32_t> selected;
  std::vector<uint8_t> taken;  // selected or dropped: no longer a candidate
  VectorD w;
  VectorD fitted;              // G[:, S] w: the part of c explained by the current fit
  // Cholesky factor of G_SS + jitter for the first `factored` selected keys, extended as keys are
  // added (O(|S|^2) per key instead of a new O(|S|^3) factorisation per refit).
  MatrixD chol;
  Eigen::Index factored = 0;
  double jitter = 0, mean_diagonal = 0;
  int unconstrained_refits = 0, clamped_refits = 0;
};

// Extends the factor to every selected key; false if the new block is not positive definite.
bool ExtendFactor(OmpState& s) {
  const Eigen::Index k = static_cast<Eigen::Index>(s.selected.size()), m = s.factored, r = k - m;
  if (r == 0) return true;
  if (s.chol.rows() < k) {  // grown geometrically: refits write into it in place
    MatrixD bigger = MatrixD::Zero(std::max<Eigen::Index>(2 * s.chol.rows(), k), std::max<Eigen::Index>(2 * s.chol.rows(), k));
    bigger.topLeftCorner(m, m) = s.chol.topLeftCorner(m, m);
    s.chol = std::move(bigger);
  }
  // G_{S_old, S_new} and G_{S_new, S_new} in one read.
  const MatrixD block = s.gram.Block(s.selected, std::vector<int32_t>(s.selected.begin() + m, s.selected.end()));
  MatrixD b = block.topRows(m), c = block.bottomRows(r);
  c.diagonal().array() += s.jitter;
  if (m > 0) s.chol.topLeftCorner(m, m).triangularView<Eigen::Lower>().solveInPlace(b);  // L11^{-1} B
  MatrixD schur = c - b.transpose() * b;
  Eigen::LLT<MatrixD> l22(schur);
  // A new key (numerically) in the span of the selected ones leaves a Schur complement that fp32
  // rounding of G can push below zero: a little more ridge on the new diagonal only.
  for (double extra : {1e-4, 1e-2}) {
    if (l22.info() == Eigen::Success) break;
    schur.diagonal().array() += extra * s.mean_diagonal;
    l22.compute(schur);
  }
  if (l22.info() != Eigen::Success) return false;
  s.chol.block(m, 0, r, m) = b.transpose();
  s.chol.block(m, m, r, r) = l22.matrixL();
  s.factored = k;
  return true;
}

// New weights for the selected keys. The unconstrained least-squares solution (from the factor)
// is the bounded optimum whenever it lies inside the box. Otherwise it is taken clamped (it
// steers the next selection and the drop rule; the mass fit after selection is exact), unless
// `exact` asks for the bounded solve.
void Refit(OmpState& s, const OmpParams& p, bool exact) {
  const Eigen::Index k = static_cast<Eigen::Index>(s.selected.size());
  VectorD c(k);
  for (Eigen::Index a = 0; a < k; ++a) c[a] = s.rhs[s.selected[a]];
  bool solved = false;
  if (ExtendFactor(s)) {
    const auto lower = s.chol.topLeftCorner(k, k).triangularView<Eigen::Lower>();
    VectorD w = lower.solve(c);
    lower.transpose().solveInPlace(w);
    const bool inside = w.allFinite() && w.minCoeff() >= p.w_lo && w.maxCoeff() <= p.w_hi;
    if (inside || (!exact && w.allFinite())) {
      s.w = w.cwiseMax(p.w_lo).cwiseMin(p.w_hi);
      solved = true;
      ++(inside ? s.unconstrained_refits : s.clamped_refits);
    }
  } else {
    s.factored = 0;  // refactor from scratch next time
  }
  if (!solved) {
    BoundedLsqOptions options;
    options.warm_start = &s.w;
    s.w = SolveBoundedLsq(s.gram.Block(s.selected, s.selected), c, p.w_lo, p.w_hi, options).w;
  }
  s.fitted.setZero();
  s.gram.Accumulate(s.selected, s.w, &s.fitted);
}

// Adds up to `count` untaken candidates with the largest residual correlation; new weights start
// at the lower bound until the next refit. With `refit_next`, the fit their weights add to is left
// alone: the refit that follows recomputes it from zero. Returns how many were added.
int64_t AddBest(OmpState& s, int64_t count, const OmpParams& p, bool refit_next) {
  std::vector<int32_t> open;
  for (int32_t j = 0; j < static_cast<int32_t>(s.taken.size()); ++j) {
    if (!s.taken[j]) open.push_back(j);
  }
  count = std::min<int64_t>(count, static_cast<int64_t>(open.size()));
  if (count == 0) return 0;
  auto better = [&](int32_t a, int32_t b) {
    const double sa = s.rhs[a] - s.fitted[a], sb = s.rhs[b] - s.fitted[b];
    return sa != sb ? sa > sb : a < b;
  };
  std::partial_sort(open.begin(), open.begin() + count, open.end(), better);
  open.resize(count);
  const Eigen::Index old = s.w.size();
  s.w.conservativeResize(old + count);
  s.w.tail(count).setConstant(p.w_lo);
  for (int32_t j : open) {
    s.selected.push_back(j);
    s.taken[j] = 1;
  }
  if (!refit_next) s.gram.Accumulate(open, s.w.tail(count), &s.fitted);
  return count;
}

// Drops selected keys whose weight is negligible, keeping at least enough candidates to refill:
// the budget stays met exactly. Returns how many were dropped.
int64_t DropNegligible(OmpState& s, const OmpParams& p, int64_t open_candidates) {
  std::vector<Eigen::Index> weak;
  for (Eigen::Index a = 0; a < s.w.size(); ++a) {
    if (std::log(s.w[a]) < p.drop_log_weight) weak.push_back(a);
  }
  std::sort(weak.begin(), weak.end(), [&](Eigen::Index a, Eigen::Index b) { return s.w[a] < s.w[b]; });
  if (static_cast<int64_t>(weak.size()) > open_candidates) weak.resize(open_candidates);
  if (weak.empty()) return 0;
  std::vector<uint8_t> drop(s.w.size(), 0);
  for (Eigen::Index a : weak) drop[a] = 1;  // stays `taken`: excluded from later selection
  std::vector<int32_t> kept;
  VectorD w(s.w.size() - static_cast<Eigen::Index>(weak.size()));
  for (Eigen::Index a = 0, b = 0; a < s.w.size(); ++a) {
    if (drop[a]) continue;
    kept.push_back(s.selected[a]);
    w[b++] = s.w[a];
  }
  s.selected = std::move(kept);
  s.w = std::move(w);
  s.factored = 0;  // the kept keys' order changed: refactor
  return static_cast<int64_t>(weak.size());
}

}  // namespace

OmpResult SelectOmp(OmpGram& gram, const VectorD& rhs, const OmpParams& params) {
  const int64_t pool = rhs.size();
  const int64_t t = std::min<int64_t>(params.budget, pool);
  OmpState s(gram, rhs);
  s.mean_diagonal = gram.MeanDiagonal();
  s.jitter = 1e-7 * s.mean_diagonal;  // above the rounding of an fp32-accumulated Gram matrix
  s.chol = MatrixD::Zero(t, t);        // its final size, once: growing it cost a sixth of the loop's host time
  OmpResult result;
  const int interval = std::max(1, params.refit_interval);
  for (int round = 0;; ++round) {
    int since_refit = 0;
    while (static_cast<int64_t>(s.selected.size()) < t) {
      int64_t k = std::max(1, params.keys_per_step);
      if (params.progressive > 0) {
        k = std::max<int64_t>(k, static_cast<int64_t>(std::ceil(params.progressive * s.selected.size())));
      }
      k = std::min<int64_t>(k, t - static_cast<int64_t>(s.selected.size()));
      const bool refit_due = since_refit + 1 >= interval;
      if (AddBest(s, k, params, refit_due || static_cast<int64_t>(s.selected.size()) + k == t) == 0) break;
      ++result.steps;
      const bool full = static_cast<int64_t>(s.selected.size()) == t;
      if (++since_refit >= interval || full) {
        Refit(s, params, params.exact_refits);
        ++result.refits;
        since_refit = 0;
      }
    }
    if (round >= params.drop_rounds) break;
    const int64_t open = pool - static_cast<int64_t>(std::count(s.taken.begin(), s.taken.end(), 1));
    const int64_t dropped = DropNegligible(s, params, open);
    if (dropped == 0) break;
    result.dropped += static_cast<int>(dropped);
    Refit(s, params, params.exact_refits);  // the residual without the dropped keys drives the next selection
    ++result.refits;
  }
  result.selected = std::move(s.selected);
  result.w = std::move(s.w);
  result.unconstrained_refits = s.unconstrained_refits;
  result.clamped_refits = s.clamped_refits;
  return result;
}

std::vector<int32_t> SelectedPositions(const OmpResult& result, const std::vector<int32_t>& pool) {
  std::vector<int32_t> kept;
  kept.reserve(result.selected.size());
  for (int32_t i : result.selected) kept.push_back(pool[i]);
  std::sort(kept.begin(), kept.end());
  return kept;
}

OmpResult SelectOmp(const MatrixD& gram, const VectorD& rhs, const OmpParams& params) {
  HostOmpGram<MatrixD> g(gram);
  return SelectOmp(g, rhs, params);
}

OmpResult SelectOmp(const ConstMatrixMapF& gram, const VectorD& rhs, const OmpParams& params) {
  HostOmpGram<ConstMatrixMapF> g(gram);
  return SelectOmp(g, rhs, params);
}

}  // namespace kvcompact
