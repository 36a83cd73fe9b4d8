#include "kernels/pinned_uploader.h"

#include <algorithm>
#include <cstring>

#include "kernels/cuda_check.h"

namespace kvcompact::kernels {

PinnedUploader::~PinnedUploader() {
  for (int b = 0; b < 2; ++b) {
    if (free_[b]) cudaEventSynchronize(free_[b]), cudaEventDestroy(free_[b]);
    if (staging_[b]) cudaFreeHost(staging_[b]);
  }
}

absl::Status PinnedUploader::Init(cudaStream_t stream, size_t chunk_bytes, int threads) {
  stream_ = stream;
  chunk_bytes_ = chunk_bytes;
  for (int b = 0; b < 2; ++b) {
    KVC_CUDA(cudaHostAlloc(&staging_[b], chunk_bytes_, cudaHostAllocDefault));
    KVC_CUDA(cudaEventCreateWithFlags(&free_[b], cudaEventDisableTiming));
  }
  pool_ = std::make_unique<ThreadPool>(std::max(1, threads));
  return absl::OkStatus();
}

absl::Status PinnedUploader::Upload(void* dst, const void* src, size_t bytes) {
  const auto* from = static_cast<const char*>(src);
  auto* to = static_cast<char*>(dst);
  const int64_t pieces = pool_->size();
  for (size_t offset = 0, k = 0; offset < bytes; offset += chunk_bytes_, ++k) {
    const int b = static_cast<int>(k % 2);
    const size_t n = std::min(chunk_bytes_, bytes - offset);
    KVC_CUDA(cudaEventSynchronize(free_[b]));  // the DMA out of this buffer has finished
    char* stage = static_cast<char*>(staging_[b]);
    const size_t piece = (n + pieces - 1) / pieces;
    pool_->ParallelFor(pieces, [&](int64_t i) {
      const size_t begin = std::min(n, i * piece), end = std::min(n, begin + piece);
      if (end > begin) std::memcpy(stage + begin, from + offset + begin, end - begin);
    });
    KVC_CUDA(cudaMemcpyAsync(to + offset, stage, n, cudaMemcpyHostToDevice, stream_));
    KVC_CUDA(cudaEventRecord(free_[b], stream_));
  }
  return absl::OkStatus();
}

}  // namespace kvcompact::kernels
