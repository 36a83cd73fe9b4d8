// Float64 brute-force references for the core tests: direct loops, no chunking, exhaustive search
// for the bounded least squares. Only for small problems.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/Dense>

namespace kvcompact::testing {

using Md = Eigen::MatrixXd;
using Vd = Eigen::VectorXd;

struct BruteStats {
  Vd row_max, mass;
  Md outputs;
  Vd rms_scores, max_scores;
  Vd top_count;  // queries whose largest attention weight is on the key
};

inline BruteStats BruteAttention(const Md& K, const Md& V, const Vd& b, const Md& Q, double s) {
  const int n = Q.rows(), T = K.rows();
  BruteStats st{Vd(n), Vd(n), Md::Zero(n, V.cols()), Vd::Zero(T), Vd::Zero(T), Vd::Zero(T)};
  for (int i = 0; i < n; ++i) {
    Vd l(T);
    for (int j = 0; j < T; ++j) l[j] = s * Q.row(i).dot(K.row(j)) + b[j];
    st.row_max[i] = l.maxCoeff();
    Vd p = (l.array() - st.row_max[i]).exp();
    st.mass[i] = p.sum();
    Eigen::Index top = 0;
    l.maxCoeff(&top);
    st.top_count[top] += 1;
    for (int j = 0; j < T; ++j) {
      st.outputs.row(i) += p[j] / st.mass[i] * V.row(j);
      st.rms_scores[j] += std::pow(p[j] / st.mass[i], 2);
      st.max_scores[j] = std::max(st.max_scores[j], p[j] / st.mass[i]);
    }
  }
  st.rms_scores = (st.rms_scores / n).cwiseSqrt();
  return st;
}

// Exhaustive bounded least squares: every variable is at lo, at hi, or free (3^t patterns); the
// best feasible free-set solution is the global minimum of the convex problem.
inline Vd BruteBoundedLsq(const Md& A, const Vd& y, double lo, double hi) {
  const int t = A.cols();
  int patterns = 1;
  for (int i = 0; i < t; ++i) patterns *= 3;
  double best = std::numeric_limits<double>::infinity();
  Vd best_w = Vd::Constant(t, lo);
  for (int p = 0; p < patterns; ++p) {
    Vd w(t);
    std::vector<int> free;
    int code = p;
    for (int j = 0; j < t; ++j, code /= 3) {
      if (code % 3 == 0) w[j] = lo;
      else if (code % 3 == 1) w[j] = hi;
      else free.push_back(j);
    }
    if (!free.empty()) {
      Md Af(A.rows(), free.size());
      for (size_t a = 0; a < free.size(); ++a) Af.col(a) = A.col(free[a]);
      Vd rest = y;
      for (int j = 0; j < t; ++j) {
        if (std::find(free.begin(), free.end(), j) == free.end()) rest -= A.col(j) * w[j];
      }
      Vd wf = Af.colPivHouseholderQr().solve(rest);
      bool feasible = true;
      for (size_t a = 0; a < free.size(); ++a) {
        if (wf[a] < lo - 1e-12 || wf[a] > hi + 1e-12) feasible = false;
        w[free[a]] = wf[a];
      }
      if (!feasible) continue;
    }
    const double obj = (A * w - y).squaredNorm();
    if (obj < best) { best = obj; best_w = w; }
  }
  return best_w;
}

}  // namespace kvcompact::testing
