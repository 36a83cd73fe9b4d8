// The attention-statistics stage alone on the device: the fused kernels (16-bit inputs) against
// the unfused path (cuBLAS TF32 products over logit chunks plus SoftmaxWithScores), on BENCH-A's
// shapes by default. Prints a table (ms, TFLOP/s, bytes of device memory written for logits) and
// a final JSON line.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "core/dtype.h"
#include "kernels/am_kernels.cuh"
#include "kernels/fused_attention.cuh"
#include "kernels/gemm.h"

ABSL_FLAG(uint32_t, heads, 8, "KV heads");
ABSL_FLAG(uint32_t, queries, 7373, "queries per head (BENCH-A's fitting queries)");
ABSL_FLAG(uint32_t, tokens, 60000, "T");
ABSL_FLAG(uint32_t, head_dim, 128, "d = dv");
ABSL_FLAG(uint32_t, reps, 5, "timed repetitions (after one warm-up)");
ABSL_FLAG(double, workspace_gib, 2.0, "the unfused path's logit workspace");

namespace {

using namespace kvcompact;

float* DeviceRandom(size_t count, uint32_t seed, DType round_through) {
  std::vector<float> host(count);
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0, 1);
  for (float& x : host) x = g(rng);
  RoundThrough(host, round_through);
  float* d = nullptr;
  cudaMalloc(&d, count * sizeof(float));
  cudaMemcpy(d, host.data(), count * sizeof(float), cudaMemcpyHostToDevice);
  return d;
}

template <typename F>
double TimeMs(F&& f, int reps) {
  f();
  cudaDeviceSynchronize();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  for (int i = 0; i < reps; ++i) f();
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  return ms / reps;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t H = absl::GetFlag(FLAGS_heads), n = absl::GetFlag(FLAGS_queries), T = absl::GetFlag(FLAGS_tokens),
                d = absl::GetFlag(FLAGS_head_dim);
  const int reps = static_cast<int>(absl::GetFlag(FLAGS_reps));
  const float scale = 1.f / std::sqrt(float(d));
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  float* q = DeviceRandom(H * n * d, 1, DType::kBFloat16);
  float* k = DeviceRandom(H * T * d, 2, DType::kBFloat16);
  float* v = DeviceRandom(H * T * d, 3, DType::kBFloat16);
  float *row_max, *mass, *outputs, *scores;
  cudaMalloc(&row_max, H * n * sizeof(float));
  cudaMalloc(&mass, H * n * sizeof(float));
  cudaMalloc(&outputs, H * n * d * sizeof(float));
  cudaMalloc(&scores, H * T * sizeof(float));
  void* fused_ws = nullptr;
  cudaMalloc(&fused_ws, kernels::FusedStatsWorkspaceBytes(H, n, T, d, d));
  const auto rms = std::optional(kernels::ScoreReduceKind::kRms);
  const double forward_tflop = 4.0 * H * n * T * d / 1e12, scores_tflop = 2.0 * H * n * T * d / 1e12;

  const double fused_forward = TimeMs([&] {
    kernels::FusedAttentionStats(DType::kBFloat16, q, n, k, v, nullptr, H, T, d, d, scale, row_max, mass, outputs,
                                 std::nullopt, scores, fused_ws, nullptr);
  }, reps);
  const double fused_all = TimeMs([&] {
    kernels::FusedAttentionStats(DType::kBFloat16, q, n, k, v, nullptr, H, T, d, d, scale, row_max, mass, outputs, rms,
                                 scores, fused_ws, nullptr);
  }, reps);

  cublasHandle_t blas;
  cublasCreate(&blas);
  cublasSetMathMode(blas, CUBLAS_TF32_TENSOR_OP_MATH);
  const int64_t chunk = std::clamp<int64_t>(
      static_cast<int64_t>(absl::GetFlag(FLAGS_workspace_gib) * (1 << 30) / sizeof(float)) / (H * T), 1, n);
  float* logits = nullptr;
  cudaMalloc(&logits, chunk * H * T * sizeof(float));
  const double unfused = TimeMs([&] {
    cudaMemsetAsync(scores, 0, H * T * sizeof(float));
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t rows = std::min(chunk, n - r0);
      (void)kernels::Gemm(blas, rows, T, d, scale, {q + r0 * d, d, n * d, false}, {k, d, T * d, true}, 0.f, logits, T,
                          rows * T, H);
      kernels::SoftmaxWithScores(logits, H, rows, T, nullptr, T, row_max + r0, mass + r0, n, rms, scores, nullptr);
      (void)kernels::Gemm(blas, rows, d, T, 1.f, {logits, T, rows * T, false}, {v, d, T * d, false}, 0.f,
                          outputs + r0 * d, d, n * d, H);
    }
    kernels::FinalizeScores(scores, H * T, n, *rms, nullptr);
  }, reps);
  const cudaError_t err = cudaDeviceSynchronize();

  printf("%s, H=%lld n=%lld T=%lld d=%lld, %d reps\n", prop.name, (long long)H, (long long)n, (long long)T, (long long)d,
         reps);
  printf("%-44s %10s %10s\n", "stage", "ms", "TFLOP/s");
  printf("%-44s %10.2f %10.1f\n", "fused: 16-bit copies + forward (M, m, Y)", fused_forward, forward_tflop / fused_forward * 1e3);
  printf("%-44s %10.2f %10.1f\n", "fused: scores (difference)", fused_all - fused_forward,
         scores_tflop / (fused_all - fused_forward) * 1e3);
  printf("%-44s %10.2f %10.1f\n", "fused: all", fused_all, (forward_tflop + scores_tflop) / fused_all * 1e3);
  printf("%-44s %10.2f %10.1f\n", "unfused (cuBLAS TF32 + SoftmaxWithScores)", unfused, forward_tflop / unfused * 1e3);
  printf("{\"bench\":\"fused_stats\",\"gpu\":\"%s\",\"heads\":%lld,\"queries\":%lld,\"tokens\":%lld,\"d\":%lld,"
         "\"fused_forward_ms\":%.3f,\"fused_all_ms\":%.3f,\"unfused_ms\":%.3f,\"cuda\":\"%s\"}\n",
         prop.name, (long long)H, (long long)n, (long long)T, (long long)d, fused_forward, fused_all, unfused,
         cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
