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
  return Staged(dst, bytes, [from](char* stage, size_t begin, size_t end) { std::memcpy(stage, from + begin, end - begin); });
}

absl::Status PinnedUploader::UploadAsBf16(uint16_t* dst, const float* src, size_t count) {
  return Staged(dst, count * 2, [src](char* stage, size_t begin, size_t end) {
    auto* out = reinterpret_cast<uint16_t*>(stage);
    for (size_t i = begin / 2, e = end / 2; i < e; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &src[i], 4);
      // Round to nearest even; NaN stays NaN (the inputs were checked finite before this).
      *out++ = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
  });
}

absl::Status PinnedUploader::Staged(void* dst, size_t bytes, const std::function<void(char*, size_t, size_t)>& fill) {
  auto* to = static_cast<char*>(dst);
  const int64_t pieces = pool_->size();
  for (size_t offset = 0, k = 0; offset < bytes; offset += chunk_bytes_, ++k) {
    const int b = static_cast<int>(k % 2);
    const size_t n = std::min(chunk_bytes_, bytes - offset);
    KVC_CUDA(cudaEventSynchronize(free_[b]));  // the DMA out of this buffer has finished
    char* stage = static_cast<char*>(staging_[b]);
    const size_t piece = (n + pieces - 1) / pieces / 16 * 16 + 16;  // whole elements in every piece
    pool_->ParallelFor(pieces, [&](int64_t i) {
      const size_t begin = std::min(n, i * piece), end = std::min(n, begin + piece);
      if (end > begin) fill(stage + begin, offset + begin, offset + end);
    });
    KVC_CUDA(cudaMemcpyAsync(to + offset, stage, n, cudaMemcpyHostToDevice, stream_));
    KVC_CUDA(cudaEventRecord(free_[b], stream_));
  }
  return absl::OkStatus();
}

}  // namespace kvcompact::kernels
