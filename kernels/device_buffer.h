// A grow-only device allocation: reused across layers so the steady state allocates nothing.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>

#include "kernels/cuda_check.h"

namespace kvcompact::kernels {

// Bytes held by all DeviceBuffers of the process, and the most held at once.
inline std::atomic<size_t> g_device_bytes{0};
inline std::atomic<size_t> g_device_bytes_peak{0};

// Bytes held by one owner's DeviceBuffers (a backend): with several backends on one device, each
// bounds its own share. A buffer is charged to the account of the thread that allocated it.
using DeviceMemoryAccount = std::atomic<size_t>;
inline thread_local DeviceMemoryAccount* t_device_account = nullptr;

// Charges the DeviceBuffers this thread allocates within the scope to `account`.
class DeviceAccountScope {
 public:
  explicit DeviceAccountScope(DeviceMemoryAccount* account) : previous_(t_device_account) { t_device_account = account; }
  ~DeviceAccountScope() { t_device_account = previous_; }
  DeviceAccountScope(const DeviceAccountScope&) = delete;
  DeviceAccountScope& operator=(const DeviceAccountScope&) = delete;

 private:
  DeviceMemoryAccount* previous_;
};

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Release(); }
  // Ensures room for `count` elements (contents are not preserved when it grows).
  absl::Status Reserve(size_t count) {
    if (count <= capacity_) return absl::OkStatus();
    Release();
    KVC_CUDA(cudaMalloc(&ptr_, count * sizeof(T)));
    capacity_ = count;
    account_ = t_device_account;
    if (account_) *account_ += count * sizeof(T);
    const size_t now = g_device_bytes += count * sizeof(T);
    size_t peak = g_device_bytes_peak.load();
    while (now > peak && !g_device_bytes_peak.compare_exchange_weak(peak, now)) {
    }
    return absl::OkStatus();
  }
  T* get() const { return ptr_; }
  void Release() {
    if (ptr_) {
      cudaFree(ptr_);
      g_device_bytes -= capacity_ * sizeof(T);
      if (account_) *account_ -= capacity_ * sizeof(T);
    }
    ptr_ = nullptr;
    capacity_ = 0;
    account_ = nullptr;
  }
  size_t capacity() const { return capacity_; }

 private:
  T* ptr_ = nullptr;
  size_t capacity_ = 0;
  DeviceMemoryAccount* account_ = nullptr;
};

// A grow-only pinned host allocation (fast device-to-host copies), reused across layers.
template <typename T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { Release(); }
  absl::Status Reserve(size_t count) {
    if (count <= capacity_) return absl::OkStatus();
    Release();
    KVC_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&ptr_), count * sizeof(T), cudaHostAllocDefault));
    capacity_ = count;
    return absl::OkStatus();
  }
  T* get() const { return ptr_; }
  size_t capacity() const { return capacity_; }
  void Release() {
    if (ptr_) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    capacity_ = 0;
  }

 private:
  T* ptr_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace kvcompact::kernels
