// Host-to-device copies of large pageable buffers through two pinned staging buffers: host threads
// copy chunk k+1 into one while the DMA engine moves chunk k from the other, so the copy runs at
// the link's pinned rate instead of the driver's single-threaded pageable path.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "core/thread_pool.h"

namespace kvcompact::kernels {

class PinnedUploader {
 public:
  PinnedUploader() = default;
  ~PinnedUploader();
  PinnedUploader(const PinnedUploader&) = delete;
  PinnedUploader& operator=(const PinnedUploader&) = delete;

  absl::Status Init(cudaStream_t stream, size_t chunk_bytes, int threads);
  // Enqueues dst <- src on the stream; returns once src may be reused (the last chunk is staged).
  absl::Status Upload(void* dst, const void* src, size_t bytes);
  // The same for `count` floats sent as bf16 (rounded to nearest even while staging): half the
  // bytes through host memory and the link, and exact for values that arrived in bf16.
  absl::Status UploadAsBf16(uint16_t* dst, const float* src, size_t count);
  // The staging threads, for other host work of the same upload between transfers.
  ThreadPool& threads() { return *pool_; }

 private:
  // Copies `bytes` to dst through the staging buffers; fill(stage, begin, end) writes staged bytes
  // [begin, end) of the whole transfer.
  absl::Status Staged(void* dst, size_t bytes, const std::function<void(char*, size_t, size_t)>& fill);

  cudaStream_t stream_ = nullptr;
  size_t chunk_bytes_ = 0;
  void* staging_[2] = {nullptr, nullptr};
  cudaEvent_t free_[2] = {nullptr, nullptr};
  std::unique_ptr<ThreadPool> pool_;
};

}  // namespace kvcompact::kernels
