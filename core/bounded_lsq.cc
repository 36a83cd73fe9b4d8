#include "core/bounded_lsq.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <Eigen/Cholesky>

namespace kvcompact {
namespace {

VectorD Clamp(const VectorD& w, double lo, double hi) { return w.cwiseMax(lo).cwiseMin(hi); }

double Objective(const MatrixD& gram, const VectorD& rhs, const VectorD& w) {
  return 0.5 * w.dot(gram * w) - rhs.dot(w);
}

// Newton direction on `free` (solving G_FF d_F = -g_F), diagonally scaled gradient elsewhere.
VectorD ProjectedNewtonDirection(const MatrixD& gram, const VectorD& grad,
                                 const std::vector<Eigen::Index>& free) {
  const Eigen::Index t = grad.size();
  VectorD dir(t);
  for (Eigen::Index j = 0; j < t; ++j) dir[j] = -grad[j] / std::max(gram(j, j), 1e-300);
  if (free.empty()) return dir;
  const Eigen::Index f = static_cast<Eigen::Index>(free.size());
  MatrixD sub(f, f);
  VectorD g(f);
  for (Eigen::Index a = 0; a < f; ++a) {
    g[a] = grad[free[a]];
    for (Eigen::Index b = 0; b < f; ++b) sub(a, b) = gram(free[a], free[b]);
  }
  // A relative jitter keeps LDLT well-posed on rank-deficient systems (duplicate keys).
  sub.diagonal().array() += 1e-13 * (sub.trace() / f + 1e-300);
  // Blocked Cholesky first (fast for large t); LDLT only if the jittered system is not PD.
  Eigen::LLT<MatrixD> llt(sub);
  const VectorD step = llt.info() == Eigen::Success ? VectorD(-llt.solve(g)) : VectorD(-sub.ldlt().solve(g));
  if (!step.allFinite()) return dir;
  for (Eigen::Index a = 0; a < f; ++a) dir[free[a]] = step[a];
  return dir;
}

}  // namespace

double ProjectedGradientNorm(const MatrixD& gram, const VectorD& rhs, const VectorD& w, double lo,
                             double hi) {
  const VectorD grad = gram * w - rhs;
  return (w - Clamp(w - grad, lo, hi)).cwiseAbs().maxCoeff();
}

BoundedLsqResult SolveBoundedLsq(const MatrixD& gram, const VectorD& rhs, double lo, double hi,
                                 const BoundedLsqOptions& options) {
  const Eigen::Index t = rhs.size();
  BoundedLsqResult result;
  if (t == 0) {
    result.converged = true;
    return result;
  }
  // Convergence is judged on the diagonally scaled gradient, which has the units of w.
  const VectorD inv_diag = gram.diagonal().cwiseMax(1e-300).cwiseInverse();

  VectorD w;
  if (options.warm_start != nullptr && options.warm_start->size() == t) {
    w = Clamp(*options.warm_start, lo, hi);
  } else {
    // Start from the clamped unconstrained solution: often already optimal or close.
    MatrixD jittered = gram;
    jittered.diagonal().array() += 1e-12 * (gram.trace() / t + 1e-300);
    Eigen::LLT<MatrixD> llt(jittered);
    w = Clamp(llt.info() == Eigen::Success ? VectorD(llt.solve(rhs)) : VectorD(jittered.ldlt().solve(rhs)), lo, hi);
  }
  if (!w.allFinite()) w = VectorD::Constant(t, std::clamp(1.0, lo, hi));

  for (int it = 0; it < options.max_iterations; ++it) {
    const VectorD grad = gram * w - rhs;
    const VectorD scaled_grad = grad.cwiseProduct(inv_diag);
    const double pg = (w - Clamp(w - scaled_grad, lo, hi)).cwiseAbs().maxCoeff();
    result.iterations = it;
    if (pg <= options.tolerance * std::max(1.0, w.cwiseAbs().maxCoeff())) {
      result.converged = true;
      break;
    }
    // Epsilon-binding set: at (or within eps of) a bound with the gradient pushing outward.
    const double eps = std::min(pg, 1e-3 * (hi - lo));  // pg: scaled, in w units
    std::vector<Eigen::Index> free;
    free.reserve(t);
    for (Eigen::Index j = 0; j < t; ++j) {
      const bool at_lo = w[j] <= lo + eps && grad[j] > 0;
      const bool at_hi = w[j] >= hi - eps && grad[j] < 0;
      if (!at_lo && !at_hi) free.push_back(j);
    }
    const VectorD dir = ProjectedNewtonDirection(gram, grad, free);
    const double f0 = Objective(gram, rhs, w);
    double alpha = 1.0;
    bool moved = false;
    for (int ls = 0; ls < 40; ++ls, alpha *= 0.5) {
      const VectorD trial = Clamp(w + alpha * dir, lo, hi);
      const double decrease = f0 - Objective(gram, rhs, trial);
      if (decrease >= 1e-4 * grad.dot(w - trial) && decrease >= 0) {
        moved = (trial - w).cwiseAbs().maxCoeff() > 0;
        w = trial;
        break;
      }
    }
    if (!moved) {
      // Newton arc failed (numerically flat): fall back to one projected-gradient step.
      const double lipschitz = std::max(gram.diagonal().sum(), 1e-300);
      w = Clamp(w - grad / lipschitz, lo, hi);
    }
    result.iterations = it + 1;
  }
  result.projected_gradient = ProjectedGradientNorm(gram, rhs, w, lo, hi);
  result.w = std::move(w);
  return result;
}

BoundedLsqResult SolveBoundedLsqAccelerated(const MatrixD& gram, const VectorD& rhs, double lo, double hi,
                                            const AcceleratedLsqOptions& options) {
  const Eigen::Index t = rhs.size();
  BoundedLsqResult result;
  if (t == 0) {
    result.converged = true;
    return result;
  }
  // Unit diagonal: one step size suits every variable (the columns of Phi span decades).
  const VectorD s = gram.diagonal().cwiseMax(1e-300).cwiseSqrt();
  const VectorD inv_s = s.cwiseInverse();
  // G' is held in fp32 (the device reads it once per iteration: half the bytes, and a layer's
  // heads fit in L2): its entries lie in [-1, 1] and G itself was built from fp32 products.
  const MatrixD g = (inv_s.asDiagonal() * gram * inv_s.asDiagonal()).cast<float>().cast<double>();
  const VectorD c = rhs.cwiseProduct(inv_s);
  const VectorD u_lo = lo * s, u_hi = hi * s;

  // L from power iteration; trace(G') <= t bounds the largest eigenvalue where it falls short.
  VectorD v = VectorD::Ones(t);
  double norm = 0;
  for (int k = 0; k < std::max(1, options.power_iterations); ++k) {
    const VectorD gv = g * v;
    const double n = gv.norm();
    if (!(n > 0)) break;
    v = gv / n;
    norm = k == 0 ? n / std::sqrt(static_cast<double>(t)) : n;  // |v| = sqrt(t) at the first step
  }
  const double tt = static_cast<double>(t);
  const double step = 1.0 / std::max(norm > 0 ? std::min(1.02 * norm, tt) : tt, 1e-300);

  VectorD x = s.cwiseMax(u_lo).cwiseMin(u_hi);  // w = 1
  VectorD y = x;
  double momentum = 1;
  for (int it = 0; it < options.max_iterations; ++it) {
    const VectorD grad = g * y - c;
    const VectorD next = (y - step * grad).cwiseMax(u_lo).cwiseMin(u_hi);
    const double pg = ((y - (y - grad).cwiseMax(u_lo).cwiseMin(u_hi)).cwiseProduct(inv_s)).cwiseAbs().maxCoeff();
    const double size = std::max(1.0, y.cwiseProduct(inv_s).cwiseAbs().maxCoeff());
    result.iterations = it + 1;
    if (pg <= options.tolerance * size) {
      x = next;
      result.converged = true;
      break;
    }
    const double next_momentum = 0.5 * (1 + std::sqrt(1 + 4 * momentum * momentum));
    if ((y - next).dot(next - x) > 0) {  // the step turned back: restart the momentum
      y = next;
      momentum = 1;
    } else {
      y = next + ((momentum - 1) / next_momentum) * (next - x);
      momentum = next_momentum;
    }
    x = next;
  }
  result.w = x.cwiseProduct(inv_s).cwiseMax(lo).cwiseMin(hi);
  result.projected_gradient = ProjectedGradientNorm(gram, rhs, result.w, lo, hi);
  return result;
}

}  // namespace kvcompact
