// The OMP greedy loop's reads of a candidate pool's Gram matrix (core/omp.h OmpGram) answered on
// the device that built it: G (P x P, fp32, symmetric) never travels to the host; a step moves
// its few selected indices and weights there and a P-vector or a small block back. Sums are in
// float64, as the host matrix's are.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "core/omp.h"
#include "kernels/device_buffer.h"

namespace kvcompact::kernels {

class DeviceOmpGram final : public OmpGram {
 public:
  // Room for a pool of up to `pool` keys and budgets of up to `budget`: the device and pinned
  // buffers are allocated here, by the calling thread (charged to its device account), so the
  // loop's thread allocates nothing.
  absl::Status Reserve(int64_t pool, int64_t budget);
  // Serves `gram` (device, P x P row-major, complete before the loop's first read) on `stream`.
  void Bind(const float* gram, int64_t P, cudaStream_t stream);
  // The first error met; once set, reads return zeros and the loop's result is to be discarded.
  const absl::Status& status() const { return status_; }

  int64_t size() const override { return P_; }
  double MeanDiagonal() override;
  void Accumulate(const std::vector<int32_t>& cols, const VectorD& w, VectorD* into) override;
  MatrixD Block(const std::vector<int32_t>& rows, const std::vector<int32_t>& cols) override;

 private:
  bool Fail(absl::Status s);
  bool Fits(size_t indices, size_t block);

  const float* gram_ = nullptr;
  int64_t P_ = 0, pool_ = 0, budget_ = 0;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer<int32_t> index_;   // rows then cols (at most 2 budget)
  DeviceBuffer<double> vec_;      // the P-vector accumulated into, then the weights (budget)
  DeviceBuffer<float> block_;     // budget x budget
  PinnedBuffer<int32_t> host_index_;
  PinnedBuffer<double> host_vec_;
  PinnedBuffer<float> host_block_;
  absl::Status status_;
};

// The launchers (device_omp_gram_kernels.cu): into[j] += sum_a w[a] G[cols[a]][j] (k columns, as
// rows of the symmetric G); out[r][c] = G[rows[r]][cols[c]]; *sum = sum_j G[j][j].
void AccumulateGramRows(const float* gram, int64_t P, const int32_t* cols, const double* w, int64_t k, double* into,
                        cudaStream_t stream);
void GatherGramBlock(const float* gram, int64_t P, const int32_t* rows, int64_t nr, const int32_t* cols, int64_t nc,
                     float* out, cudaStream_t stream);
void SumGramDiagonal(const float* gram, int64_t P, double* sum, cudaStream_t stream);
// g[i][j] = g[j][i] for j < i (P x P row-major): completes a symmetric matrix of which the upper
// triangle was written (cuBLAS syrk's column-major lower one).
void MirrorUpperToLower(float* g, int64_t P, cudaStream_t stream);

}  // namespace kvcompact::kernels
