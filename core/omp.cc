#include "core/omp.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <Eigen/Cholesky>

#include "core/bounded_lsq.h"

namespace kvcompact {
namespace {

// `Gram` is MatrixD, or a map of an fp32 matrix (as the CUDA backend copies it back): entries are
// read as float64, so weights, residuals and the factor are float64 either way.
template <typename Gram>
struct OmpState {
  OmpState(const Gram& g, const VectorD& c) : gram(g), rhs(c), taken(c.size(), 0), fitted(VectorD::Zero(c.size())) {}
  const Gram& gram;
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
template <typename Gram>
bool ExtendFactor(OmpState<Gram>& s) {
  const Eigen::Index k = static_cast<Eigen::Index>(s.selected.size()), m = s.factored, r = k - m;
  if (r == 0) return true;
  if (s.chol.rows() < k) {  // grown geometrically: refits write into it in place
    MatrixD bigger = MatrixD::Zero(std::max<Eigen::Index>(2 * s.chol.rows(), k), std::max<Eigen::Index>(2 * s.chol.rows(), k));
    bigger.topLeftCorner(m, m) = s.chol.topLeftCorner(m, m);
    s.chol = std::move(bigger);
  }
  // G_{S_old, S_new} and G_{S_new, S_new}, read row by row (G is row-major and symmetric).
  MatrixD b(m, r), c(r, r);
  for (Eigen::Index a = 0; a < k; ++a) {
    const auto row = s.gram.row(s.selected[a]);
    for (Eigen::Index j = 0; j < r; ++j) (a < m ? b(a, j) : c(a - m, j)) = row[s.selected[m + j]];
  }
  c.diagonal().array() += s.jitter;
  if (m > 0) s.chol.topLeftCorner(m, m).template triangularView<Eigen::Lower>().solveInPlace(b);  // L11^{-1} B
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
template <typename Gram>
void Refit(OmpState<Gram>& s, const OmpParams& p, bool exact) {
  const Eigen::Index k = static_cast<Eigen::Index>(s.selected.size());
  VectorD c(k);
  for (Eigen::Index a = 0; a < k; ++a) c[a] = s.rhs[s.selected[a]];
  bool solved = false;
  if (ExtendFactor(s)) {
    const auto lower = s.chol.topLeftCorner(k, k).template triangularView<Eigen::Lower>();
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
    MatrixD sub(k, k);
    for (Eigen::Index a = 0; a < k; ++a) {
      for (Eigen::Index b = 0; b < k; ++b) sub(a, b) = s.gram(s.selected[a], s.selected[b]);
    }
    BoundedLsqOptions options;
    options.warm_start = &s.w;
    s.w = SolveBoundedLsq(sub, c, p.w_lo, p.w_hi, options).w;
  }
  // G is symmetric: rows (contiguous in the row-major matrix) stand for its columns.
  s.fitted.setZero();
  for (Eigen::Index a = 0; a < k; ++a) s.fitted += s.gram.row(s.selected[a]).transpose().template cast<double>() * s.w[a];
}

// Adds up to `count` untaken candidates with the largest residual correlation; new weights start
// at the lower bound until the next refit. Returns how many were added.
template <typename Gram>
int64_t AddBest(OmpState<Gram>& s, int64_t count, const OmpParams& p) {
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
  const Eigen::Index old = s.w.size();
  s.w.conservativeResize(old + count);
  for (int64_t i = 0; i < count; ++i) {
    s.selected.push_back(open[i]);
    s.taken[open[i]] = 1;
    s.w[old + i] = p.w_lo;
    s.fitted += s.gram.row(open[i]).transpose().template cast<double>() * p.w_lo;
  }
  return count;
}

// Drops selected keys whose weight is negligible, keeping at least enough candidates to refill:
// the budget stays met exactly. Returns how many were dropped.
template <typename Gram>
int64_t DropNegligible(OmpState<Gram>& s, const OmpParams& p, int64_t open_candidates) {
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

template <typename Gram>
OmpResult SelectOmpImpl(const Gram& gram, const VectorD& rhs, const OmpParams& params) {
  const int64_t pool = rhs.size();
  const int64_t t = std::min<int64_t>(params.budget, pool);
  OmpState<Gram> s(gram, rhs);
  s.mean_diagonal = pool > 0 ? static_cast<double>(gram.diagonal().template cast<double>().mean()) : 0.0;
  s.jitter = 1e-7 * s.mean_diagonal;  // above the rounding of an fp32-accumulated Gram matrix
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
      if (AddBest(s, k, params) == 0) break;
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

}  // namespace

std::vector<int32_t> SelectedPositions(const OmpResult& result, const std::vector<int32_t>& pool) {
  std::vector<int32_t> kept;
  kept.reserve(result.selected.size());
  for (int32_t i : result.selected) kept.push_back(pool[i]);
  std::sort(kept.begin(), kept.end());
  return kept;
}

OmpResult SelectOmp(const MatrixD& gram, const VectorD& rhs, const OmpParams& params) {
  return SelectOmpImpl(gram, rhs, params);
}

OmpResult SelectOmp(const ConstMatrixMapF& gram, const VectorD& rhs, const OmpParams& params) {
  return SelectOmpImpl(gram, rhs, params);
}

}  // namespace kvcompact
