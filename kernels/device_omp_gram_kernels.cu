#include "kernels/device_omp_gram.h"

#include <algorithm>

namespace kvcompact::kernels {
namespace {

// A block covers 32 consecutive j (one warp wide, coalesced reads of each row) and splits the k
// rows over its 8 warps; the 8 partial sums meet in shared memory.
constexpr int kColumns = 32, kSlices = 8;

__global__ void AccumulateGramRowsKernel(const float* gram, int64_t P, const int32_t* cols, const double* w, int64_t k,
                                         double* into) {
  __shared__ double partial[kSlices][kColumns];
  const int64_t j = int64_t{blockIdx.x} * kColumns + threadIdx.x;
  double acc = 0;
  if (j < P) {
#pragma unroll 4
    for (int64_t a = threadIdx.y; a < k; a += kSlices) acc = fma(static_cast<double>(gram[cols[a] * P + j]), w[a], acc);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < P) {
    double sum = into[j];
    for (int s = 0; s < kSlices; ++s) sum += partial[s][threadIdx.x];
    into[j] = sum;
  }
}

__global__ void GatherGramBlockKernel(const float* gram, int64_t P, const int32_t* rows, int64_t nr, const int32_t* cols,
                                      int64_t nc, float* out) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < nr * nc; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = gram[int64_t{rows[i / nc]} * P + cols[i % nc]];
  }
}

__global__ void SumGramDiagonalKernel(const float* gram, int64_t P, double* sum) {
  __shared__ double partial[256];
  double acc = 0;
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) acc += gram[j * P + j];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int step = blockDim.x / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) partial[threadIdx.x] += partial[threadIdx.x + step];
    __syncthreads();
  }
  if (threadIdx.x == 0) *sum = partial[0];
}

__global__ void MirrorUpperToLowerKernel(float* g, int64_t P) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < P * P; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / P, c = i % P;
    if (c < r) g[i] = g[c * P + r];
  }
}

}  // namespace

void MirrorUpperToLower(float* g, int64_t P, cudaStream_t stream) {
  if (P < 2) return;
  const int64_t blocks = std::min<int64_t>((P * P + 255) / 256, 65536);
  MirrorUpperToLowerKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(g, P);
}

void AccumulateGramRows(const float* gram, int64_t P, const int32_t* cols, const double* w, int64_t k, double* into,
                        cudaStream_t stream) {
  if (P == 0) return;
  AccumulateGramRowsKernel<<<static_cast<unsigned>((P + kColumns - 1) / kColumns), dim3(kColumns, kSlices), 0, stream>>>(
      gram, P, cols, w, k, into);
}

void GatherGramBlock(const float* gram, int64_t P, const int32_t* rows, int64_t nr, const int32_t* cols, int64_t nc,
                     float* out, cudaStream_t stream) {
  if (nr * nc == 0) return;
  const int64_t blocks = std::min<int64_t>((nr * nc + 255) / 256, 4096);
  GatherGramBlockKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(gram, P, rows, nr, cols, nc, out);
}

void SumGramDiagonal(const float* gram, int64_t P, double* sum, cudaStream_t stream) {
  SumGramDiagonalKernel<<<1, 256, 0, stream>>>(gram, P, sum);
}

}  // namespace kvcompact::kernels
