// Row gather shared by the CPU benchmarks: m's rows at `idx`, in that order.
#pragma once

#include <vector>

#include "core/types.h"

namespace kvcompact {

inline MatrixF Rows(const MatrixF& m, const std::vector<int32_t>& idx) {
  MatrixF out(static_cast<Eigen::Index>(idx.size()), m.cols());
  for (size_t i = 0; i < idx.size(); ++i) out.row(static_cast<Eigen::Index>(i)) = m.row(idx[i]);
  return out;
}

}  // namespace kvcompact
