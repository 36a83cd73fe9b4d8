// The CUDA backend: the same Backend interface and the same results (within fp32 tolerance) as
// the CPU backend. It owns one stream and the cuBLAS/cuSOLVER handles on its device; one thread
// calls it (a lane of the server's worker). Several backends may share a device, each bounding its
// own buffers (`memory_share`).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/layer.h"
#include "core/pipeline.h"

namespace kvcompact::kernels {

struct CudaBackendOptions {
  int device = 0;
  bool allow_tf32 = false;                 // cuBLAS TF32 tensor-op math for the large products
  // With allow_tf32, for layers whose inputs arrived in bf16 or fp16: the attention statistics by
  // the fused kernels (kernels/fused_attention.cuh); off: cuBLAS products over logit chunks.
  bool fused_stats = true;
  size_t workspace_bytes = size_t{2} << 30;  // bound on the logit chunk (heads x rows x T floats)
  // Bound on the backend's device memory; a layer that would exceed it is compacted in groups of
  // heads. 0: 90% of the device memory free at start-up.
  size_t memory_limit_bytes = 0;
  // This backend's share of that bound, where several backends share the device (layers in flight).
  double memory_share = 1.0;
  // The mass fit's solver: the accelerated projected gradient (every head in lockstep, no
  // factorisation) or the CPU backend's projected Newton (a cuSOLVER Cholesky per head and step).
  bool mass_fit_newton = false;
  // The mass fit's iteration bound; 0: MassFitAcceleratedIterations or kMassFitMaxIterations
  // (core/fit.h). For benchmarks only.
  int mass_fit_max_iterations = 0;
  // Streams (each with its own cuBLAS and cuSOLVER handles and one head's buffers) over which a
  // layer's value fits and evaluations are spread: the per-head Cholesky chains overlap.
  int head_lanes = 1;
};

// Device bytes the backend needs to compact `heads` heads of this job's shape at once, as a part
// fixed per layer plus a part per head.
struct DeviceBytes {
  size_t fixed = 0, per_head = 0;
};
DeviceBytes EstimateDeviceBytes(const LayerJob& job, size_t workspace_bytes, int head_lanes = CudaBackendOptions{}.head_lanes);

// The pipeline's steps (core/pipeline.h) of a backend made by MakeCudaBackend, bound to `job`
// (which must outlive their use): for tests that compare each step with the CPU's.
LayerSteps& CudaStepsFor(Backend& backend, const LayerJob& job);

// "" when a CUDA device is usable, else why not.
std::string CudaUnavailableReason();
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options);
// `lanes` backends on one device for that many layers in flight, each with an equal share of the
// memory bound (`memory_share` = 1 / lanes).
absl::StatusOr<std::vector<std::unique_ptr<Backend>>> MakeCudaBackends(CudaBackendOptions options, int lanes);

}  // namespace kvcompact::kernels
