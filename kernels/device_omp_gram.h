// The OMP greedy loop's reads of a candidate pool's Gram matrix (core/omp.h OmpGram) answered on
// the device from the pool's mass features: G = Phi^T Phi is never formed. With Phi^T (P x n,
// row j = key j's features over the n fitting queries) on the device, G[:, S] w = Phi^T (Phi_S w)
// is two passes over Phi^T in float64, and a block G[R, C] one small product of gathered rows; a
// step moves its few indices and weights to the device and a P-vector or a block back. Forming G
// (P^2 n) was most of OMP's time; the loop's reads cost about 2 P n per step.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "core/omp.h"
#include "kernels/device_buffer.h"

namespace kvcompact::kernels {

class DeviceOmpGram final : public OmpGram {
 public:
  // Room for a pool of up to `pool` keys, `queries` fitting queries and budgets of up to
  // `budget`: the device and pinned buffers are allocated here, by the calling thread (charged to
  // its device account), so the loop's thread allocates nothing.
  absl::Status Reserve(int64_t pool, int64_t queries, int64_t budget);
  // Serves G = Phi^T Phi for `phi_t` (device, P x n row-major; complete before the loop's first
  // read) on `stream`, block products with `blas` (bound to `stream`, fp32 math).
  void Bind(const float* phi_t, int64_t P, int64_t n, cudaStream_t stream, cublasHandle_t blas);
  // The first error met; once set, reads return zeros and the loop's result is to be discarded.
  const absl::Status& status() const { return status_; }

  int64_t size() const override { return P_; }
  double MeanDiagonal() override;
  void Accumulate(const std::vector<int32_t>& cols, const VectorD& w, VectorD* into) override;
  MatrixD Block(const std::vector<int32_t>& rows, const std::vector<int32_t>& cols) override;

 private:
  bool Fail(absl::Status s);
  bool Within(size_t indices, int64_t max_indices);

  const float* phi_t_ = nullptr;
  int64_t P_ = 0, n_ = 0, pool_ = 0, queries_ = 0, budget_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  DeviceBuffer<int32_t> index_;   // rows then cols (at most 2 budget)
  DeviceBuffer<double> vec_;      // the P-vector accumulated into | the weights (budget) | Phi_S w (n)
  DeviceBuffer<float> gathered_;  // rows of Phi^T for a block (2 budget x n)
  DeviceBuffer<float> block_;     // budget x budget
  PinnedBuffer<int32_t> host_index_;
  PinnedBuffer<double> host_vec_;
  PinnedBuffer<float> host_block_;
  absl::Status status_;
};

// The launchers (device_omp_gram_kernels.cu), on row-major fp32 matrices with rows of `width`:
// into[j] += sum_a w[a] m[rows[a]][j] (k rows; float64);
void AccumulateRows(const float* m, int64_t width, const int32_t* rows, const double* w, int64_t k, double* into,
                    cudaStream_t stream);
// into[j] += m[j] . v (`count` rows; float64);
void AddRowDots(const float* m, int64_t count, int64_t width, const double* v, double* into, cudaStream_t stream);
// *sum = sum of the squares of every element of m (`count` rows; float64).
void SumOfSquares(const float* m, int64_t count, int64_t width, double* sum, cudaStream_t stream);

}  // namespace kvcompact::kernels
