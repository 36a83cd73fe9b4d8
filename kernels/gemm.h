// Row-major GEMM on cuBLAS (which is column-major): C = alpha op(A) op(B) + beta C, strided-batched.
// A row-major matrix is the column-major transpose, so C^T = op(B)^T op(A)^T is what cuBLAS computes.
#pragma once

#include <cublas_v2.h>

#include <cstdint>

#include "kernels/cuda_check.h"

namespace kvcompact::kernels {

struct RowMajor {
  const float* data;
  int64_t ld;       // elements between rows as stored
  int64_t stride;   // elements between batch entries (0 for a single matrix)
  bool transpose;   // use op(X) = X^T
};

inline absl::Status Gemm(cublasHandle_t h, int64_t m, int64_t n, int64_t k, float alpha, RowMajor a, RowMajor b,
                         float beta, float* c, int64_t ldc, int64_t stride_c, int64_t batch) {
  KVC_CUBLAS(cublasSgemmStridedBatched(h, b.transpose ? CUBLAS_OP_T : CUBLAS_OP_N,
                                       a.transpose ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n),
                                       static_cast<int>(m), static_cast<int>(k), &alpha, b.data,
                                       static_cast<int>(b.ld), b.stride, a.data, static_cast<int>(a.ld), a.stride,
                                       &beta, c, static_cast<int>(ldc), stride_c, static_cast<int>(batch)));
  return absl::OkStatus();
}

}  // namespace kvcompact::kernels
