// Element-wise and reduction kernels of the GPU Attention Matching pipeline. Matrices are
// row-major fp32, batched over heads with a fixed stride. Each launcher is the one production
// entry point: the backend, the tests and the benchmarks call these.
//
// CPU references (core/): attention.cc (RowSoftmaxStats, SoftmaxWithScores), selection.cc
// (MaxPool1d), fit.cc (ExpShifted, RowSoftmax), compact_head.cc (MeasureErrors: RowSums).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

namespace kvcompact::kernels {

enum class ScoreReduceKind : int { kRms = 1, kMean = 2, kMax = 3 };

// Logits of `heads` x `rows_per_head` rows x cols (+ optional per-column bias per head:
// bias + head * bias_stride) -> row max M, mass m = sum exp(L - M), and in place
// A = exp(L - M) / m (the softmax). M and m of row i of head h go to [h * out_head_stride + i]
// (null: not written). One block per row.
void RowSoftmaxStats(float* logits, int64_t heads, int64_t rows_per_head, int64_t cols, const float* bias,
                     int64_t bias_stride, float* row_max, float* mass, int64_t out_head_stride, cudaStream_t stream);

// RowSoftmaxStats (row_max and mass required) and, with `reduce`, scores[h][j] (+)= reduce_i A[h][i][j]
// over the rows, in one fewer pass over the logits than the two separately: a read for the row
// statistics, then one read and one write that normalise and reduce column tiles together. kRms
// and kMean accumulate sums (of squares), kMax the maximum; FinalizeScores finishes them.
// `column_max` (optional, heads x cols): also the largest A over the rows, as kMax would;
// `argmax_counts` (optional, heads x cols): += 1 at each row's most-attended column (the first
// on ties): the parts of the composite scores (core/attention.h CompositeScores).
void SoftmaxWithScores(float* logits, int64_t heads, int64_t rows_per_head, int64_t cols, const float* bias,
                       int64_t bias_stride, float* row_max, float* mass, int64_t out_head_stride,
                       std::optional<ScoreReduceKind> reduce, float* scores, cudaStream_t stream,
                       float* column_max = nullptr, float* argmax_counts = nullptr);
// kRms: sqrt(sum / n); kMean: sum / n; kMax: unchanged.
void FinalizeScores(float* scores, int64_t count, int64_t n, ScoreReduceKind reduce, cudaStream_t stream);

// In place: x[i][j] = exp(x[i][j] + bias[j] - shift[i])  (rows x cols). bias may be null.
void ExpShifted(float* x, int64_t rows, int64_t cols, const float* bias, const float* shift, cudaStream_t stream);

// In place: x[i][j] += bias[j].
void AddColumnBias(float* x, int64_t rows, int64_t cols, const float* bias, cudaStream_t stream);

// out[i] = sum_j x[i][j].
void RowSums(const float* x, int64_t rows, int64_t cols, float* out, cudaStream_t stream);

// In place: x[i][:] /= max(d[i], floor).
void DivideRows(float* x, int64_t rows, int64_t cols, const float* d, float floor, cudaStream_t stream);

// out[i] = the float of bf16 in[i] (exact).
void WidenBf16(const uint16_t* in, int64_t count, float* out, cudaStream_t stream);

// out[r][:] = in[index[r]][:]  (gather of `count` rows of width `cols`).
void GatherRows(const float* in, const int32_t* index, int64_t count, int64_t cols, float* out, cudaStream_t stream);

// The value fit's ridge toward the selection's values (core/fit.cc FitValues): lambda = ridge * trace(a) / n on the
// diagonal of a (n x n), and lambda * V[idx]^T added to rhs (column-major n x dv, leading
// dimension n; V row-major with dv columns).
void AddRidgeTowardRows(float* a, float* rhs, const float* values, const int32_t* idx, int64_t n, int64_t dv, float ridge,
                        cudaStream_t stream);
// The mass fit's prior toward w = 1: lambda = prior * trace(gram) / n on the diagonal, lambda on rhs.
void AddPriorTowardOne(double* gram, double* rhs, int64_t n, double prior, cudaStream_t stream);

// Accumulates into sums[0..2]: sum (yhat - y)^2, sum y^2 over n x dv outputs, and
// sum_i |max(mhat_i, 1e-30) - m_i| / m_i; from them the relative output error and the mean
// relative mass error of core/compact_head.cc ErrorsFromOutputs.
// With `mhat_max` (and `true_max`, the full rows' maxima): mhat_i is a sum of exp(l - mhat_max_i)
// and the mass compared is exp(mhat_max_i - true_max_i) * mhat_i, formed in fp64.
void ErrorSums(const float* yhat, const float* y, int64_t n, int64_t dv, const float* mhat, const float* m, double* sums,
               cudaStream_t stream, const float* mhat_max = nullptr, const float* true_max = nullptr);

}  // namespace kvcompact::kernels
