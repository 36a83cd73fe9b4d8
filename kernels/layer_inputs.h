// A layer's inputs on the device (K, V, b and the fitting / held-out queries, split as the CPU
// backend splits them), in two slots: the next layer's inputs upload on a copy stream while this
// layer computes.
#pragma once

#include <cuda_runtime.h>

#include <future>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/layer.h"
#include "core/thread_pool.h"
#include "kernels/device_buffer.h"
#include "kernels/pinned_uploader.h"

namespace kvcompact::kernels {

struct LayerInputs {
  DeviceBuffer<float> keys, values, bias, q_fit, q_eval;
  int64_t nf = 0, ne = 0;  // fitting / held-out queries per head
  std::vector<int64_t> distinct_fit;  // per head: DistinctQueryCount of its fitting queries (host)
};

class InputStager {
 public:
  InputStager() = default;
  ~InputStager();
  InputStager(const InputStager&) = delete;
  InputStager& operator=(const InputStager&) = delete;

  // `account`: charged with the device buffers uploads allocate (also on the upload thread).
  absl::Status Init(int device, int copy_threads, DeviceMemoryAccount* account = nullptr);
  // Starts uploading `job` into a free slot on the stager's upload thread; returns at once. The stager
  // keeps the job alive until it is acquired or superseded.
  void Prefetch(std::shared_ptr<const LayerJob> job);
  // The device inputs of `job`, complete on the device: the prefetched slot when it holds this
  // job, else uploaded now. Valid until the next Prefetch or Acquire.
  absl::StatusOr<const LayerInputs*> Acquire(const LayerJob& job);
  // Waits for uploads in flight and frees the device buffers.
  void Release();

 private:
  struct Slot {
    LayerInputs inputs;
    PinnedUploader uploader;
    DeviceBuffer<uint16_t> wire16;  // bf16 inputs on their way to the fp32 buffers
    cudaStream_t copy = nullptr;
    // The split queries on the host, reused across layers (no allocation or page faults per layer).
    std::vector<float> q_fit, q_eval;
  };
  struct Staging {
    int slot = -1;
    std::shared_ptr<const LayerJob> job;
    std::shared_future<absl::Status> done;
  };
  absl::Status Upload(const LayerJob& job, Slot& slot);

  int device_ = 0;
  DeviceMemoryAccount* account_ = nullptr;
  Slot slots_[2];
  std::unique_ptr<ThreadPool> upload_thread_;  // one long-lived thread runs the prefetches
  Staging ready_, pending_;  // a finished upload not yet acquired; one in flight
};

}  // namespace kvcompact::kernels
