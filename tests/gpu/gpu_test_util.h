// Helpers of the GPU tests: skipping without a device, guarded device buffers, relative errors.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cuda_backend.h"

namespace kvcompact {

#define SKIP_WITHOUT_GPU()                                                     \
  do {                                                                         \
    if (std::string why = kernels::CudaUnavailableReason(); !why.empty()) {    \
      GTEST_SKIP() << "no CUDA device: " << why;                               \
    }                                                                          \
  } while (0)

constexpr float kGuard = -12345.f;

// Device copy of a host vector with `pad` guard values on each side.
struct Guarded {
  float* base = nullptr;
  size_t n = 0, pad = 64;
  explicit Guarded(const std::vector<float>& host) : n(host.size()) {
    std::vector<float> all(n + 2 * pad, kGuard);
    std::copy(host.begin(), host.end(), all.begin() + pad);
    cudaMalloc(&base, all.size() * sizeof(float));
    cudaMemcpy(base, all.data(), all.size() * sizeof(float), cudaMemcpyHostToDevice);
  }
  ~Guarded() { cudaFree(base); }
  float* data() { return base + pad; }
  std::vector<float> Read(bool* guards_intact) const {
    std::vector<float> all(n + 2 * pad);
    cudaMemcpy(all.data(), base, all.size() * sizeof(float), cudaMemcpyDeviceToHost);
    *guards_intact = true;
    for (size_t i = 0; i < pad; ++i) *guards_intact &= all[i] == kGuard && all[pad + n + i] == kGuard;
    return std::vector<float>(all.begin() + pad, all.begin() + pad + n);
  }
};

inline double RelErr(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += double(a[i] - b[i]) * (a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace kvcompact
