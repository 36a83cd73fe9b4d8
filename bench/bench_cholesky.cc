// Cholesky factorisations of a batch of SPD systems (one per KV head), shaped like the mass fit's
// Newton systems (fp64, order = the free variables of t) and the value fit's (fp32, order t),
// through each cuSOLVER route: one stream, one stream per problem, the batched API (uniform
// order). The per-head factorisations are a third of BENCH-A's GPU time; this says which route
// a batched solver should take. Prints a table; the last line is JSON.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"

ABSL_FLAG(uint32_t, problems, 8, "systems per batch (KV heads of a layer)");
ABSL_FLAG(uint32_t, repeats, 5, "timed runs per configuration (median reported)");

namespace {

#define CK(call)                                                                    \
  do {                                                                              \
    if (int e_ = static_cast<int>(call); e_ != 0) {                                 \
      fprintf(stderr, "%s failed: %d (line %d)\n", #call, e_, __LINE__);            \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

// `count` SPD matrices X^T X / rows + 1e-6 I of order n in precision T, contiguous, on the device
// (X: 2n x n, positive entries spread over decades, like exp of logits; the product by cuBLAS in
// fp64: forming it on the host took minutes at n = 1,200).
template <typename T>
T* MakeSystems(int count, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g(0, 1);
  const int rows = 2 * n;
  const size_t nn = size_t(n) * n;
  std::vector<double> x(size_t(rows) * n);
  double *dx = nullptr, *dg = nullptr;
  CK(cudaMalloc(&dx, sizeof(double) * x.size()));
  CK(cudaMalloc(&dg, sizeof(double) * nn));
  std::vector<double> gram(nn);
  std::vector<T> out(nn * count);
  cublasHandle_t blas;
  CK(cublasCreate(&blas));
  for (int b = 0; b < count; ++b) {
    for (double& v : x) v = std::exp(1.5 * g(rng) - 3);
    CK(cudaMemcpy(dx, x.data(), sizeof(double) * x.size(), cudaMemcpyHostToDevice));
    const double alpha = 1.0 / rows, beta = 0;
    CK(cublasDgemm(blas, CUBLAS_OP_N, CUBLAS_OP_T, n, n, rows, &alpha, dx, n, dx, n, &beta, dg, n));
    CK(cudaMemcpy(gram.data(), dg, sizeof(double) * nn, cudaMemcpyDeviceToHost));
    for (int i = 0; i < n; ++i) gram[size_t(i) * n + i] += 1e-6;
    std::transform(gram.begin(), gram.end(), out.begin() + nn * b, [](double v) { return static_cast<T>(v); });
  }
  cublasDestroy(blas);
  cudaFree(dx), cudaFree(dg);
  T* device = nullptr;
  CK(cudaMalloc(&device, sizeof(T) * out.size()));
  CK(cudaMemcpy(device, out.data(), sizeof(T) * out.size(), cudaMemcpyHostToDevice));
  return device;
}

template <typename T>
cusolverStatus_t Potrf(cusolverDnHandle_t h, int n, T* a, T* work, int lwork, int* info);
template <>
cusolverStatus_t Potrf(cusolverDnHandle_t h, int n, double* a, double* work, int lwork, int* info) {
  return cusolverDnDpotrf(h, CUBLAS_FILL_MODE_LOWER, n, a, n, work, lwork, info);
}
template <>
cusolverStatus_t Potrf(cusolverDnHandle_t h, int n, float* a, float* work, int lwork, int* info) {
  return cusolverDnSpotrf(h, CUBLAS_FILL_MODE_LOWER, n, a, n, work, lwork, info);
}
template <typename T>
int PotrfWork(cusolverDnHandle_t h, int n, T* a) {
  int lwork = 0;
  if constexpr (sizeof(T) == 8) {
    CK(cusolverDnDpotrf_bufferSize(h, CUBLAS_FILL_MODE_LOWER, n, a, n, &lwork));
  } else {
    CK(cusolverDnSpotrf_bufferSize(h, CUBLAS_FILL_MODE_LOWER, n, a, n, &lwork));
  }
  return std::max(lwork, 1);
}

struct Lanes {
  std::vector<cudaStream_t> streams;
  std::vector<cusolverDnHandle_t> solvers;
  std::vector<cudaEvent_t> done;  // each lane's end, joined into stream 0 (made here, not while timing)
  explicit Lanes(int count) : streams(count), solvers(count), done(count) {
    for (int i = 0; i < count; ++i) {
      CK(cudaStreamCreateWithFlags(&streams[i], cudaStreamNonBlocking));
      CK(cusolverDnCreate(&solvers[i]));
      CK(cusolverDnSetStream(solvers[i], streams[i]));
      CK(cudaEventCreateWithFlags(&done[i], cudaEventDisableTiming));
    }
  }
  ~Lanes() {
    for (size_t i = 0; i < streams.size(); ++i) {
      cudaEventDestroy(done[i]), cusolverDnDestroy(solvers[i]), cudaStreamDestroy(streams[i]);
    }
  }
};

// Median milliseconds of factoring all `count` systems: route 0 one stream, 1 a stream per
// system, 2 the batched API. Every run starts from the pristine copy; info must stay 0.
template <typename T>
double TimeRoute(int route, int count, int n, const T* pristine, T* a, Lanes& lanes, int repeats) {
  const size_t nn = size_t(n) * n;
  int lwork = PotrfWork<T>(lanes.solvers[0], n, a);
  T* work = nullptr;
  int* info = nullptr;
  CK(cudaMalloc(&work, sizeof(T) * size_t(lwork) * count));
  CK(cudaMalloc(&info, sizeof(int) * count));
  T** ptrs = nullptr;
  CK(cudaMalloc(&ptrs, sizeof(T*) * count));
  std::vector<T*> host_ptrs(count);
  for (int b = 0; b < count; ++b) host_ptrs[b] = a + b * nn;
  CK(cudaMemcpy(ptrs, host_ptrs.data(), sizeof(T*) * count, cudaMemcpyHostToDevice));
  cudaEvent_t start, stop;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int r = 0; r <= repeats; ++r) {
    CK(cudaMemcpy(a, pristine, sizeof(T) * nn * count, cudaMemcpyDeviceToDevice));
    CK(cudaMemset(info, 0, sizeof(int) * count));
    CK(cudaDeviceSynchronize());
    CK(cudaEventRecord(start, lanes.streams[0]));
    if (route == 2) {
      if constexpr (sizeof(T) == 8) {
        CK(cusolverDnDpotrfBatched(lanes.solvers[0], CUBLAS_FILL_MODE_LOWER, n, ptrs, n, info, count));
      } else {
        CK(cusolverDnSpotrfBatched(lanes.solvers[0], CUBLAS_FILL_MODE_LOWER, n, ptrs, n, info, count));
      }
    } else {
      const int used = route == 0 ? 1 : std::min<int>(count, lanes.streams.size());
      for (int k = 1; k < used; ++k) CK(cudaStreamWaitEvent(lanes.streams[k], start, 0));
      for (int b = 0; b < count; ++b) {
        const int k = b % used;
        CK(Potrf<T>(lanes.solvers[k], n, a + b * nn, work + size_t(lwork) * b, lwork, info + b));
      }
      for (int k = 1; k < used; ++k) {
        CK(cudaEventRecord(lanes.done[k], lanes.streams[k]));
        CK(cudaStreamWaitEvent(lanes.streams[0], lanes.done[k], 0));
      }
    }
    CK(cudaEventRecord(stop, lanes.streams[0]));
    CK(cudaEventSynchronize(stop));
    float t = 0;
    CK(cudaEventElapsedTime(&t, start, stop));
    if (r > 0) ms.push_back(t);  // the first run warms up
  }
  std::vector<int> host_info(count);
  CK(cudaMemcpy(host_info.data(), info, sizeof(int) * count, cudaMemcpyDeviceToHost));
  for (int b = 0; b < count; ++b) {
    if (host_info[b] != 0) fprintf(stderr, "route %d n %d system %d: info %d\n", route, n, b, host_info[b]);
  }
  cudaFree(work), cudaFree(info), cudaFree(ptrs), cudaEventDestroy(start), cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

template <typename T>
std::vector<double> Routes(int count, int n, Lanes& lanes, int repeats) {
  T* pristine = MakeSystems<T>(count, n, 1000 + n);
  T* a = nullptr;
  CK(cudaMalloc(&a, sizeof(T) * size_t(n) * n * count));
  std::vector<double> out;
  for (int route = 0; route < 3; ++route) out.push_back(TimeRoute<T>(route, count, n, pristine, a, lanes, repeats));
  cudaFree(pristine), cudaFree(a);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int count = static_cast<int>(absl::GetFlag(FLAGS_problems));
  const int repeats = static_cast<int>(std::max(1u, absl::GetFlag(FLAGS_repeats)));
  Lanes lanes(count);
  printf("%-6s %6s %14s %16s %14s\n", "dtype", "order", "one stream ms", "stream each ms", "batched ms");
  std::string json = "{\"bench\":\"cholesky\",\"problems\":" + std::to_string(count) + ",\"rows\":[";
  bool first = true;
  for (int n : {128, 256, 448, 768, 1200}) {
    for (int precision : {64, 32}) {
      const std::vector<double> t =
          precision == 64 ? Routes<double>(count, n, lanes, repeats) : Routes<float>(count, n, lanes, repeats);
      printf("%-6s %6d %14.3f %16.3f %14.3f\n", precision == 64 ? "fp64" : "fp32", n, t[0], t[1], t[2]);
      char row[160];
      snprintf(row, sizeof(row), "%s{\"dtype\":\"fp%d\",\"order\":%d,\"one_stream_ms\":%.4f,\"stream_each_ms\":%.4f,\"batched_ms\":%.4f}",
               first ? "" : ",", precision, n, t[0], t[1], t[2]);
      json += row;
      first = false;
    }
  }
  printf("%s]}\n", json.c_str());
  return 0;
}
