#include "core/fit.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include <Eigen/Cholesky>

namespace kvcompact {

MassSystem BuildMassSystem(const MatrixF& subset_logits, const VectorF& row_max, const VectorF& mass, double prior) {
  const MatrixF phi = (subset_logits.colwise() - row_max).array().exp().matrix();
  MassSystem system{(phi.transpose() * phi).cast<double>(), (phi.transpose() * mass).cast<double>()};
  if (prior > 0 && system.gram.rows() > 0) {
    const double lambda = prior * system.gram.trace() / static_cast<double>(system.gram.rows());
    system.gram.diagonal().array() += lambda;
    system.rhs.array() += lambda;  // lambda * 1: the pull toward w = 1
  }
  return system;
}

int MassFitAcceleratedIterations(int64_t t, int64_t distinct_queries) {
  if (distinct_queries <= 0) return kMassFitAcceleratedMaxIterations;
  const double wanted = std::ceil(kMassFitAcceleratedMaxIterations * static_cast<double>(t) /
                                 static_cast<double>(distinct_queries));
  return static_cast<int>(std::clamp(wanted, static_cast<double>(kMassFitAcceleratedMinIterations),
                                     static_cast<double>(kMassFitAcceleratedMaxIterations)));
}

MassFitResult FitMass(const MatrixF& subset_logits, const VectorF& row_max, const VectorF& mass,
                      const VectorF& subset_bias, double w_lo, double w_hi, double prior, MassFitSolver solver,
                      int64_t distinct_queries) {
  const auto [gram, rhs] = BuildMassSystem(subset_logits, row_max, mass, prior);
  MassFitResult result;
  const auto start = std::chrono::steady_clock::now();
  result.solver = solver == MassFitSolver::kAccelerated
                      ? SolveBoundedLsqAccelerated(gram, rhs, w_lo, w_hi,
                                                   MassFitAcceleratedOptions(rhs.size(), distinct_queries))
                      : SolveBoundedLsq(gram, rhs, w_lo, w_hi, MassFitSolverOptions());
  result.solve_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.beta = (result.solver.w.array().log().cast<float>() + subset_bias.array()).matrix();
  return result;
}

MatrixF RowSoftmax(const MatrixF& logits) {
  const VectorF row_max = logits.rowwise().maxCoeff();
  MatrixF probs = (logits.colwise() - row_max).array().exp().matrix();
  const VectorF sums = probs.rowwise().sum();
  probs.array().colwise() /= sums.array();
  return probs;
}

MatrixF FitValues(const MatrixF& design, const MatrixF& targets, double ridge, const MatrixF* prior) {
  MatrixD gram = (design.transpose() * design).cast<double>();
  MatrixD rhs = (design.transpose() * targets).cast<double>();
  const Eigen::Index t = gram.rows();
  const double lambda = ridge * (t > 0 ? gram.trace() / t : 0.0);
  gram.diagonal().array() += lambda;
  if (prior != nullptr) rhs += lambda * prior->cast<double>();
  Eigen::LLT<MatrixD> llt(gram);
  if (llt.info() == Eigen::Success) return llt.solve(rhs).cast<float>();
  // Only reachable with ridge = 0 and a singular X; LDLT still gives a usable solution.
  return gram.ldlt().solve(rhs).cast<float>();
}

}  // namespace kvcompact
