// The batched bounded NNLS of the mass fit alone on the GPU (kernels/device_lsq.h): a batch of
// problems shaped like one layer's (8 heads, n = 8,192 fitting queries, t = T / ratio unknowns,
// weights pushed against the upper bound as at high ratios), for a few t and lane counts. Prints a
// table; the last line is JSON.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "kernels/device_lsq.h"

ABSL_FLAG(uint32_t, problems, 8, "problems per batch (KV heads of a layer)");
ABSL_FLAG(uint32_t, rows, 8192, "rows of A (fitting queries)");
ABSL_FLAG(uint32_t, repeats, 3, "timed solves per configuration (median reported)");

namespace {

using Clock = std::chrono::steady_clock;

#define CHECK_OK(expr)                                                         \
  do {                                                                         \
    const absl::Status s_ = (expr);                                            \
    if (!s_.ok()) {                                                            \
      fprintf(stderr, "%s: %s\n", #expr, s_.ToString().c_str());               \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace kvcompact::kernels;
  const int count = static_cast<int>(absl::GetFlag(FLAGS_problems));
  const int64_t n = absl::GetFlag(FLAGS_rows);
  cudaStream_t stream;
  cublasHandle_t blas;
  cudaStreamCreate(&stream);
  cublasCreate(&blas);
  cublasSetStream(blas, stream);
  std::mt19937_64 rng(5);
  std::normal_distribution<double> g(0, 1);
  printf("%6s %6s %10s %10s %12s\n", "t", "lanes", "solve ms", "mean iter", "converged");
  std::string json = "[";
  for (int64_t t : {300, 1200, 3000}) {
    // One A per configuration on the device (shared by the batch), Gram by DGEMM.
    std::vector<double> a(n * t), w_star(t), y(n, 0.0);
    for (double& x : a) x = std::exp(1.5 * g(rng) - 3);
    for (double& w : w_star) w = 50 * std::exp(g(rng));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < t; ++j) y[i] += a[i * t + j] * w_star[j];
    double *d_a, *d_y;
    cudaMalloc(&d_a, a.size() * sizeof(double));
    cudaMalloc(&d_y, y.size() * sizeof(double));
    cudaMemcpy(d_a, a.data(), a.size() * sizeof(double), cudaMemcpyHostToDevice);
    cudaMemcpy(d_y, y.data(), y.size() * sizeof(double), cudaMemcpyHostToDevice);
    for (int lanes : {1, 8}) {
      DeviceBoundedLsq lsq(blas, stream, lanes);
      CHECK_OK(lsq.Init());
      std::vector<double> times;
      double iterations = 0;
      int converged = 0;
      for (uint32_t r = 0; r <= absl::GetFlag(FLAGS_repeats); ++r) {
        CHECK_OK(lsq.Reset(std::vector<LsqBounds>(count, LsqBounds{t, std::exp(-3.0), std::exp(3.0)})));
        const double one = 1, zero = 0;
        for (int i = 0; i < count; ++i) {  // G = A^T A, c = A^T y (A row-major n x t = column-major t x n)
          cublasDgemm(blas, CUBLAS_OP_N, CUBLAS_OP_T, t, t, n, &one, d_a, t, d_a, t, &zero, lsq.gram(i), t);
          cublasDgemv(blas, CUBLAS_OP_N, t, n, &one, d_a, t, d_y, 1, &zero, lsq.rhs(i), 1);
        }
        cudaStreamSynchronize(stream);
        std::vector<LsqOutcome> outcomes;
        const auto start = Clock::now();
        CHECK_OK(lsq.Solve({}, &outcomes));
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
        if (r == 0) continue;  // warm-up
        times.push_back(ms);
        iterations = 0, converged = 0;
        for (const auto& o : outcomes) iterations += o.iterations / double(count), converged += o.converged;
      }
      std::sort(times.begin(), times.end());
      const double median = times[times.size() / 2];
      printf("%6lld %6d %10.2f %10.1f %9d/%d\n", (long long)t, lanes, median, iterations, converged, count);
      char buf[160];
      snprintf(buf, sizeof(buf), "%s{\"t\":%lld,\"lanes\":%d,\"solve_ms\":%.3f,\"iterations\":%.1f}", json.size() > 1 ? "," : "",
               (long long)t, lanes, median, iterations);
      json += buf;
    }
    cudaFree(d_a);
    cudaFree(d_y);
  }
  printf("{\"bench\":\"lsq\",\"problems\":%d,\"rows\":%lld,\"results\":%s]}\n", count, (long long)n, json.c_str());
  return 0;
}
