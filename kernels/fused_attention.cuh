// Attention statistics of a layer without the n x T logits in device memory. Per head h, for
// queries Q (n x d), keys K (T x d), values V (T x dv), an optional key bias b (T) and a scale s:
//   L = s Q K^T + b,  M_i = max_j L_ij,  m_i = sum_j exp(L_ij - M_i),  Y = softmax(L) V,
// and, with `reduce`, finished key scores over the rows of softmax(L) (rms: sqrt(mean p^2), mean,
// max). For inputs that arrived in a 16-bit dtype (bf16 or fp16: Q, K and V hold values exact in
// it) on 16-bit tensor cores: a pass writes 16-bit copies of Q, K and V into the workspace (exact,
// padded to whole tiles); a flash-attention style kernel runs over key tiles per query tile for M,
// m and Y (products exact in fp32 accumulation; the probabilities rounded to the dtype for P V, as
// FlashAttention does); a second runs over query tiles per key tile for the scores, from M and m.
//
// Layouts: row-major fp32, heads stacked (Q: h * n * d, K: h * T * d, V: h * T * dv, b: h * T, M
// and m: h * n, Y: h * n * dv, scores: h * T); `outputs` and `workspace` 16-byte aligned.
// CPU reference: core/attention.cc (the same statistics in fp32/fp64).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <optional>

#include "core/dtype.h"
#include "kernels/am_kernels.cuh"

namespace kvcompact::kernels {

// Whether the fused kernels serve inputs of this dtype and these head sizes on the current device
// (bf16 or fp16; head sizes 64 and 128; compute capability 8.0 or later).
bool FusedStatsSupported(DType inputs, int64_t d, int64_t dv);

// Bytes of the workspace FusedAttentionStats needs for this shape.
size_t FusedStatsWorkspaceBytes(int64_t heads, int64_t n, int64_t T, int64_t d, int64_t dv);

// Launches the kernels on `stream` (the scores kernel only with `reduce`); false and nothing
// launched when FusedStatsSupported is false, n, T or heads is not positive, or `outputs` or
// `workspace` is not 16-byte aligned.
bool FusedAttentionStats(DType inputs, const float* q, int64_t n, const float* k, const float* v, const float* bias,
                         int64_t heads, int64_t T, int64_t d, int64_t dv, float scale, float* row_max, float* mass,
                         float* outputs, std::optional<ScoreReduceKind> reduce, float* scores, void* workspace,
                         cudaStream_t stream);

}  // namespace kvcompact::kernels
