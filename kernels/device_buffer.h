// A grow-only device allocation: reused across layers so the steady state allocates nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/cuda_check.h"

namespace kvcompact::kernels {

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  // Ensures room for `count` elements (contents are not preserved when it grows).
  absl::Status Reserve(size_t count) {
    if (count <= capacity_) return absl::OkStatus();
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    capacity_ = 0;
    KVC_CUDA(cudaMalloc(&ptr_, count * sizeof(T)));
    capacity_ = count;
    return absl::OkStatus();
  }
  T* get() const { return ptr_; }
  size_t capacity() const { return capacity_; }

 private:
  T* ptr_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace kvcompact::kernels
