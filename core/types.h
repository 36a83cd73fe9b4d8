// Eigen aliases shared by the core. Matrices are row-major so that a (tokens x dim) buffer from the
// wire maps without a copy.
#pragma once

#include <Eigen/Core>

namespace kvcompact {

using MatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using VectorF = Eigen::VectorXf;
using VectorD = Eigen::VectorXd;
using ConstMatrixMapF = Eigen::Map<const MatrixF>;
using ConstVectorMapF = Eigen::Map<const VectorF>;

}  // namespace kvcompact
