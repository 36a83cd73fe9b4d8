#include "kernels/am_kernels.cuh"

#include <algorithm>
#include <cfloat>
#include <climits>

namespace kvcompact::kernels {
namespace {

constexpr int kBlock = 256;

__device__ float BlockReduceSum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

// Online softmax statistics: one read pass keeps a running (max, sum) per thread, merged across
// the block; a second pass writes exp(x - M) / m. Two reads and one write per element.
__device__ void MergeMaxSum(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  s = (m == -FLT_MAX ? 0.f : s * expf(m - mx)) + (m2 == -FLT_MAX ? 0.f : s2 * expf(m2 - mx));
  m = mx;
}

// (max, sum exp(x - max)) of one row of x (+ b), reduced over the block; every thread gets it.
__device__ void RowMaxSum(const float* x, const float* b, int64_t cols, float* shared_m, float* shared_s, float& m_out,
                          float& s_out) {
  float m = -FLT_MAX, s = 0.f;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float v = b ? x[j] + b[j] : x[j];
    if (v > m) {
      s = s * expf(m - v) + 1.f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  for (int o = 16; o > 0; o >>= 1) MergeMaxSum(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < (blockDim.x >> 5) ? shared_m[lane] : -FLT_MAX;
    s = lane < (blockDim.x >> 5) ? shared_s[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) MergeMaxSum(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
    if (lane == 0) {
      shared_m[0] = m;
      shared_s[0] = s;
    }
  }
  __syncthreads();
  m_out = shared_m[0];
  s_out = shared_s[0];
}

__global__ void RowSoftmaxStatsKernel(float* logits, int64_t cols, const float* bias, int64_t rows_per_head,
                                      int64_t bias_stride, float* row_max, float* mass, int64_t out_head_stride) {
  __shared__ float shared_m[32], shared_s[32];
  const int64_t row = blockIdx.x;
  const int64_t head = row / rows_per_head, within = row % rows_per_head;
  float* x = logits + row * cols;
  const float* b = bias ? bias + head * bias_stride : nullptr;
  float m, s;
  RowMaxSum(x, b, cols, shared_m, shared_s, m, s);
  const float inv = 1.f / s;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float v = b ? x[j] + b[j] : x[j];
    x[j] = expf(v - m) * inv;
  }
  if (threadIdx.x == 0 && row_max) row_max[head * out_head_stride + within] = m;
  if (threadIdx.x == 0 && mass) mass[head * out_head_stride + within] = s;
}

// Pass 1 of SoftmaxWithScores: only the row statistics (one read of the row).
__global__ void RowStatsKernel(const float* logits, int64_t cols, const float* bias, int64_t rows_per_head,
                               int64_t bias_stride, float* row_max, float* mass, int64_t out_head_stride) {
  __shared__ float shared_m[32], shared_s[32];
  const int64_t row = blockIdx.x;
  const int64_t head = row / rows_per_head, within = row % rows_per_head;
  float m, s;
  RowMaxSum(logits + row * cols, bias ? bias + head * bias_stride : nullptr, cols, shared_m, shared_s, m, s);
  if (threadIdx.x == 0) {
    row_max[head * out_head_stride + within] = m;
    mass[head * out_head_stride + within] = s;
  }
}

// Pass 2: a tile of kScoreTileRows rows x blockDim.x columns per block, one column per thread:
// normalise in place and reduce the tile's rows into the column's score (one atomic per column
// and tile), so the probabilities are written once and not read again for the scores.
constexpr int kScoreTileRows = 32;

__global__ void NormalizeAndScoreKernel(float* logits, int64_t rows_per_head, int64_t cols, const float* bias,
                                        int64_t bias_stride, const float* row_max, const float* mass,
                                        int64_t out_head_stride, int reduce, float* scores, float* column_max) {
  __shared__ float tile_m[kScoreTileRows], tile_inv[kScoreTileRows];
  const int64_t head = blockIdx.z, r0 = int64_t(blockIdx.y) * kScoreTileRows;
  const int64_t rows = min(int64_t(kScoreTileRows), rows_per_head - r0);
  if (threadIdx.x < rows) {
    tile_m[threadIdx.x] = row_max[head * out_head_stride + r0 + threadIdx.x];
    tile_inv[threadIdx.x] = 1.f / mass[head * out_head_stride + r0 + threadIdx.x];
  }
  __syncthreads();
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  const float bj = bias ? bias[head * bias_stride + j] : 0.f;
  float* x = logits + (head * rows_per_head + r0) * cols + j;
  float acc = 0.f, top = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    const float p = expf(x[r * cols] + bj - tile_m[r]) * tile_inv[r];
    x[r * cols] = p;
    if (reduce == static_cast<int>(ScoreReduceKind::kMax)) acc = fmaxf(acc, p);
    else if (reduce == static_cast<int>(ScoreReduceKind::kRms)) acc = fmaf(p, p, acc);
    else if (reduce == static_cast<int>(ScoreReduceKind::kMean)) acc += p;
    if (column_max) top = fmaxf(top, p);
  }
  // p >= 0: the IEEE bit patterns of non-negative floats order like the floats.
  if (reduce == static_cast<int>(ScoreReduceKind::kMax)) {
    atomicMax(reinterpret_cast<int*>(scores + head * cols + j), __float_as_int(acc));
  } else if (reduce != 0) {
    atomicAdd(scores + head * cols + j, acc);
  }
  if (column_max) atomicMax(reinterpret_cast<int*>(column_max + head * cols + j), __float_as_int(top));
}

// counts[h][j] += 1 for the first column j where row i's logit (+ bias) equals its maximum M (the
// same float expression RowMaxSum maximised, so equality is exact): each row's most-attended key.
__global__ void CountRowArgmaxKernel(const float* logits, int64_t cols, const float* bias, int64_t rows_per_head,
                                     int64_t bias_stride, const float* row_max, int64_t out_head_stride, float* counts) {
  __shared__ int first;
  const int64_t row = blockIdx.x;
  const int64_t head = row / rows_per_head, within = row % rows_per_head;
  const float* x = logits + row * cols;
  const float* b = bias ? bias + head * bias_stride : nullptr;
  const float m = row_max[head * out_head_stride + within];
  if (threadIdx.x == 0) first = INT_MAX;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float v = b ? x[j] + b[j] : x[j];
    if (v == m) {
      atomicMin(&first, static_cast<int>(j));
      break;  // this thread's later columns come after j
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && first != INT_MAX) atomicAdd(counts + head * cols + first, 1.f);
}

__global__ void FinalizeScoresKernel(float* scores, int64_t count, float inv_n, int reduce) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  if (reduce == static_cast<int>(ScoreReduceKind::kRms)) scores[i] = sqrtf(scores[i] * inv_n);
  else if (reduce == static_cast<int>(ScoreReduceKind::kMean)) scores[i] *= inv_n;
}

__global__ void ExpShiftedKernel(float* x, int64_t rows, int64_t cols, const float* bias, const float* shift) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= rows * cols) return;
  const int64_t i = k / cols, j = k % cols;
  x[k] = expf(x[k] + (bias ? bias[j] : 0.f) - shift[i]);
}

__global__ void AddColumnBiasKernel(float* x, int64_t rows, int64_t cols, const float* bias) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= rows * cols) return;
  x[k] += bias[k % cols];
}

__global__ void RowSumsKernel(const float* x, int64_t cols, float* out) {
  __shared__ float shared[32];
  const float* r = x + blockIdx.x * cols;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) s += r[j];
  s = BlockReduceSum(s, shared);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

__global__ void DivideRowsKernel(float* x, int64_t rows, int64_t cols, const float* d, float floor) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= rows * cols) return;
  x[k] /= fmaxf(d[k / cols], floor);
}

__global__ void GatherRowsKernel(const float* in, const int32_t* index, int64_t count, int64_t cols, float* out) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= count * cols) return;
  const int64_t r = k / cols, c = k % cols;
  out[k] = in[int64_t(index[r]) * cols + c];
}

unsigned Blocks(int64_t n) { return static_cast<unsigned>((n + kBlock - 1) / kBlock); }

__global__ void AddRidgeTowardRowsKernel(float* a, float* rhs, const float* values, const int32_t* idx, int64_t n,
                                         int64_t dv, float ridge) {
  __shared__ float shared[32];
  float trace = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) trace += a[i * n + i];
  trace = BlockReduceSum(trace, shared);
  const float lambda = ridge * trace / static_cast<float>(n);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) a[i * n + i] += lambda;
  for (int64_t k = threadIdx.x; k < n * dv; k += blockDim.x) {
    const int64_t j = k % n, c = k / n;  // rhs is column-major: element (j, c) at c * n + j
    rhs[k] += lambda * values[static_cast<int64_t>(idx[j]) * dv + c];
  }
}

__device__ double WarpSum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

__global__ void ErrorSumsKernel(const float* yhat, const float* y, int64_t n, int64_t dv, const float* mhat,
                                const float* m, double* sums, const float* mhat_max, const float* true_max) {
  double diff = 0, ref = 0, mass = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n * dv; k += stride) {
    const double e = double(yhat[k]) - double(y[k]);
    diff += e * e;
    ref += double(y[k]) * double(y[k]);
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
    // With mhat_max: mhat is a sum shifted by the compacted row's own maximum, unshifted here in
    // fp64 (kept keys far below the full row's maximum underflow in fp32).
    const double mh = mhat_max != nullptr ? exp(double(mhat_max[i]) - double(true_max[i])) * double(mhat[i]) : double(mhat[i]);
    mass += fabs(fmax(mh, 1e-30) - double(m[i])) / double(m[i]);
  }
  diff = WarpSum(diff), ref = WarpSum(ref), mass = WarpSum(mass);
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(sums, diff);
    atomicAdd(sums + 1, ref);
    atomicAdd(sums + 2, mass);
  }
}

}  // namespace

void RowSoftmaxStats(float* logits, int64_t heads, int64_t rows_per_head, int64_t cols, const float* bias,
                     int64_t bias_stride, float* row_max, float* mass, int64_t out_head_stride, cudaStream_t stream) {
  if (heads * rows_per_head == 0) return;
  RowSoftmaxStatsKernel<<<static_cast<unsigned>(heads * rows_per_head), kBlock, 0, stream>>>(
      logits, cols, bias, rows_per_head, bias_stride, row_max, mass, out_head_stride);
}

void SoftmaxWithScores(float* logits, int64_t heads, int64_t rows_per_head, int64_t cols, const float* bias,
                       int64_t bias_stride, float* row_max, float* mass, int64_t out_head_stride,
                       std::optional<ScoreReduceKind> reduce, float* scores, cudaStream_t stream, float* column_max,
                       float* argmax_counts) {
  if (heads * rows_per_head == 0 || cols == 0) return;
  RowStatsKernel<<<static_cast<unsigned>(heads * rows_per_head), kBlock, 0, stream>>>(
      logits, cols, bias, rows_per_head, bias_stride, row_max, mass, out_head_stride);
  if (argmax_counts) {
    CountRowArgmaxKernel<<<static_cast<unsigned>(heads * rows_per_head), kBlock, 0, stream>>>(
        logits, cols, bias, rows_per_head, bias_stride, row_max, out_head_stride, argmax_counts);
  }
  const dim3 grid(Blocks(cols), static_cast<unsigned>((rows_per_head + kScoreTileRows - 1) / kScoreTileRows),
                  static_cast<unsigned>(heads));
  NormalizeAndScoreKernel<<<grid, kBlock, 0, stream>>>(logits, rows_per_head, cols, bias, bias_stride, row_max, mass,
                                                       out_head_stride, reduce ? static_cast<int>(*reduce) : 0, scores,
                                                       column_max);
}

void FinalizeScores(float* scores, int64_t count, int64_t n, ScoreReduceKind reduce, cudaStream_t stream) {
  if (count == 0) return;
  FinalizeScoresKernel<<<Blocks(count), kBlock, 0, stream>>>(scores, count, 1.f / static_cast<float>(n),
                                                             static_cast<int>(reduce));
}

void ExpShifted(float* x, int64_t rows, int64_t cols, const float* bias, const float* shift, cudaStream_t stream) {
  if (rows * cols == 0) return;
  ExpShiftedKernel<<<Blocks(rows * cols), kBlock, 0, stream>>>(x, rows, cols, bias, shift);
}

void AddColumnBias(float* x, int64_t rows, int64_t cols, const float* bias, cudaStream_t stream) {
  if (rows * cols == 0) return;
  AddColumnBiasKernel<<<Blocks(rows * cols), kBlock, 0, stream>>>(x, rows, cols, bias);
}

void RowSums(const float* x, int64_t rows, int64_t cols, float* out, cudaStream_t stream) {
  if (rows == 0) return;
  RowSumsKernel<<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(x, cols, out);
}

void DivideRows(float* x, int64_t rows, int64_t cols, const float* d, float floor, cudaStream_t stream) {
  if (rows * cols == 0) return;
  DivideRowsKernel<<<Blocks(rows * cols), kBlock, 0, stream>>>(x, rows, cols, d, floor);
}

void GatherRows(const float* in, const int32_t* index, int64_t count, int64_t cols, float* out, cudaStream_t stream) {
  if (count * cols == 0) return;
  GatherRowsKernel<<<Blocks(count * cols), kBlock, 0, stream>>>(in, index, count, cols, out);
}

void AddRidgeTowardRows(float* a, float* rhs, const float* values, const int32_t* idx, int64_t n, int64_t dv, float ridge,
                        cudaStream_t stream) {
  if (n == 0) return;
  AddRidgeTowardRowsKernel<<<1, 1024, 0, stream>>>(a, rhs, values, idx, n, dv, ridge);
}

__global__ void AddPriorTowardOneKernel(double* gram, double* rhs, int64_t n, double prior) {
  __shared__ double shared[32];
  double trace = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) trace += gram[i * n + i];
  trace = WarpSum(trace);  // then the warps' sums, in fp64
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = trace;
  __syncthreads();
  trace = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) trace += shared[w];
  const double lambda = prior * trace / static_cast<double>(n);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    gram[i * n + i] += lambda;
    rhs[i] += lambda;
  }
}

void AddPriorTowardOne(double* gram, double* rhs, int64_t n, double prior, cudaStream_t stream) {
  if (n == 0 || !(prior > 0)) return;
  AddPriorTowardOneKernel<<<1, 1024, 0, stream>>>(gram, rhs, n, prior);
}

void ErrorSums(const float* yhat, const float* y, int64_t n, int64_t dv, const float* mhat, const float* m, double* sums,
               cudaStream_t stream, const float* mhat_max, const float* true_max) {
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>(Blocks(n * dv), 1), 264);
  ErrorSumsKernel<<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(yhat, y, n, dv, mhat, m, sums, mhat_max, true_max);
}

namespace {
__global__ void WidenBf16Kernel(const uint16_t* in, int64_t count, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __uint_as_float(static_cast<uint32_t>(in[i]) << 16);
  }
}
}  // namespace

void WidenBf16(const uint16_t* in, int64_t count, float* out, cudaStream_t stream) {
  if (count <= 0) return;
  const int64_t blocks = std::min<int64_t>((count + kBlock - 1) / kBlock, 1 << 16);
  WidenBf16Kernel<<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(in, count, out);
}

}  // namespace kvcompact::kernels
