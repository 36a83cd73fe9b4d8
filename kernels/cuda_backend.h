// The CUDA backend: the same Backend interface and the same results (within fp32 tolerance) as
// the CPU backend. It owns one device, one stream and the cuBLAS/cuSOLVER handles; the server's
// single worker thread is its only caller.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/layer.h"

namespace kvcompact::kernels {

struct CudaBackendOptions {
  int device = 0;
  bool allow_tf32 = false;                 // cuBLAS TF32 tensor-op math for the large products
  size_t workspace_bytes = size_t{2} << 30;  // bound on the logit chunk (heads x rows x T floats)
};

// "" when a CUDA device is usable, else why not.
std::string CudaUnavailableReason();
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options);

}  // namespace kvcompact::kernels
