// One lane of a layer's per-head fits: a stream with its own cuBLAS and cuSOLVER handles and one
// head's buffers. The CUDA backend spreads the value fits and evaluations of a layer's heads over
// a few lanes, so that the heads' latency-bound chains (a cuSOLVER Cholesky of t x t, small
// products, softmax rows) overlap instead of queueing on one stream.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda_check.h"
#include "kernels/device_buffer.h"

namespace kvcompact::kernels {

struct HeadLane {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  cudaEvent_t done = nullptr;  // the lane's last queued head of a layer
  bool owns_handles = false;   // lane 0 borrows the backend's stream and handles

  DeviceBuffer<int32_t> idx;  // the head's kept positions
  DeviceBuffer<float> ck, beta, subset, gram, rhs, cvec, yhat, mhat, work;

  HeadLane() = default;
  HeadLane(const HeadLane&) = delete;
  HeadLane& operator=(const HeadLane&) = delete;
  ~HeadLane() {
    if (done) cudaEventDestroy(done);
    if (!owns_handles) return;
    if (solver) cusolverDnDestroy(solver);
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamDestroy(stream);
  }

  // Lane 0: the backend's own stream and handles.
  absl::Status Borrow(cudaStream_t s, cublasHandle_t b, cusolverDnHandle_t v) {
    stream = s, blas = b, solver = v;
    KVC_CUDA(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    return absl::OkStatus();
  }
  // Further lanes: a stream and handles of their own, with the backend's math mode.
  absl::Status Create(cublasMath_t math) {
    owns_handles = true;
    KVC_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    KVC_CUBLAS(cublasCreate(&blas));
    KVC_CUBLAS(cublasSetStream(blas, stream));
    KVC_CUBLAS(cublasSetMathMode(blas, math));
    KVC_CUSOLVER(cusolverDnCreate(&solver));
    KVC_CUSOLVER(cusolverDnSetStream(solver, stream));
    KVC_CUDA(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    return absl::OkStatus();
  }

  // Room for a head of budget t against n_max queries (keys of width d, values of width dv).
  absl::Status Reserve(int64_t t, int64_t n_max, int64_t d, int64_t dv) {
    for (auto* buf : {&ck, &beta, &cvec, &mhat}) {
      if (auto s = buf->Reserve(std::max(t * std::max(d, dv), n_max)); !s.ok()) return s;
    }
    if (auto s = idx.Reserve(t); !s.ok()) return s;
    if (auto s = subset.Reserve(n_max * t); !s.ok()) return s;
    if (auto s = gram.Reserve(t * t); !s.ok()) return s;
    if (auto s = rhs.Reserve(t * dv); !s.ok()) return s;
    return yhat.Reserve(n_max * dv);
  }
  // Device bytes of Reserve(t, n_max, d, dv), for the memory estimate.
  static size_t BytesFor(int64_t t, int64_t n_max, int64_t d, int64_t dv) {
    const int64_t wide = std::max(t * std::max(d, dv), n_max);
    return sizeof(float) * static_cast<size_t>(4 * wide + n_max * t + t * t + t * dv + n_max * dv) +
           sizeof(int32_t) * static_cast<size_t>(t);
  }

  void Release() {
    for (auto* b : {&ck, &beta, &subset, &gram, &rhs, &cvec, &yhat, &mhat, &work}) b->Release();
    idx.Release();
  }
};

}  // namespace kvcompact::kernels
