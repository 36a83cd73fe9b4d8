#include <algorithm>

#include "kernels/device_omp_gram.h"

namespace kvcompact::kernels {
namespace {

// A block covers 32 consecutive columns (one warp wide, coalesced reads of each row) and splits
// the k rows over its 8 warps; the 8 partial sums meet in shared memory.
constexpr int kColumns = 32, kSlices = 8;

__global__ void AccumulateRowsKernel(const float* m, int64_t width, const int32_t* rows, const double* w, int64_t k,
                                     double* into) {
  __shared__ double partial[kSlices][kColumns];
  const int64_t j = int64_t{blockIdx.x} * kColumns + threadIdx.x;
  double acc = 0;
  if (j < width) {
#pragma unroll 4
    for (int64_t a = threadIdx.y; a < k; a += kSlices) acc = fma(static_cast<double>(m[rows[a] * width + j]), w[a], acc);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < width) {
    double sum = into[j];
    for (int s = 0; s < kSlices; ++s) sum += partial[s][threadIdx.x];
    into[j] = sum;
  }
}

__device__ __forceinline__ double WarpSum(double x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// A warp per row: coalesced reads along the row, a float64 dot with v.
__global__ void AddRowDotsKernel(const float* m, int64_t count, int64_t width, const double* v, double* into) {
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= count) return;
  const float* r = m + row * width;
  double acc = 0;
  for (int64_t c = lane; c < width; c += 32) acc = fma(static_cast<double>(r[c]), v[c], acc);
  acc = WarpSum(acc);
  if (lane == 0) into[row] += acc;
}

__global__ void SumOfSquaresKernel(const float* m, int64_t total, double* sum) {
  double acc = 0;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const double x = m[i];
    acc = fma(x, x, acc);
  }
  acc = WarpSum(acc);
  if (threadIdx.x % 32 == 0) atomicAdd(sum, acc);
}

}  // namespace

void AccumulateRows(const float* m, int64_t width, const int32_t* rows, const double* w, int64_t k, double* into,
                    cudaStream_t stream) {
  if (width == 0 || k == 0) return;
  AccumulateRowsKernel<<<static_cast<unsigned>((width + kColumns - 1) / kColumns), dim3(kColumns, kSlices), 0, stream>>>(
      m, width, rows, w, k, into);
}

void AddRowDots(const float* m, int64_t count, int64_t width, const double* v, double* into, cudaStream_t stream) {
  if (count == 0) return;
  constexpr int kThreads = 256;  // 8 rows per block
  AddRowDotsKernel<<<static_cast<unsigned>((count * 32 + kThreads - 1) / kThreads), kThreads, 0, stream>>>(m, count, width,
                                                                                                           v, into);
}

void SumOfSquares(const float* m, int64_t count, int64_t width, double* sum, cudaStream_t stream) {
  cudaMemsetAsync(sum, 0, sizeof(double), stream);
  const int64_t total = count * width;
  if (total == 0) return;
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, 1024);
  SumOfSquaresKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(m, total, sum);
}

}  // namespace kvcompact::kernels
