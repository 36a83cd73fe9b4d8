// CUDA, cuBLAS and cuSOLVER return codes as absl::Status with the call, file and line. Errors are
// statuses, never aborts; a sticky device error is marked so that the server can restart.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcompact::kernels {

// Errors after which the CUDA context is unusable (the process must restart).
inline bool IsStickyCudaError(cudaError_t e) {
  return e == cudaErrorIllegalAddress || e == cudaErrorLaunchFailure || e == cudaErrorHardwareStackError ||
         e == cudaErrorIllegalInstruction || e == cudaErrorMisalignedAddress || e == cudaErrorInvalidPc ||
         e == cudaErrorAssert || e == cudaErrorECCUncorrectable;
}

inline absl::Status CudaStatus(cudaError_t e, const char* call, const char* file, int line) {
  const std::string where = absl::StrCat(call, " at ", file, ":", line, ": ", cudaGetErrorString(e));
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(where);
  return IsStickyCudaError(e) ? absl::DataLossError(absl::StrCat("sticky CUDA error: ", where))
                              : absl::InternalError(where);
}

}  // namespace kvcompact::kernels

#define KVC_CUDA(call)                                                                          \
  do {                                                                                          \
    const cudaError_t kvc_e = (call);                                                           \
    if (kvc_e != cudaSuccess) return ::kvcompact::kernels::CudaStatus(kvc_e, #call, __FILE__, __LINE__); \
  } while (0)

#define KVC_LAUNCHED(what)                                                                      \
  do {                                                                                          \
    const cudaError_t kvc_e = cudaGetLastError();                                               \
    if (kvc_e != cudaSuccess) return ::kvcompact::kernels::CudaStatus(kvc_e, what, __FILE__, __LINE__); \
  } while (0)

#define KVC_CUBLAS(call)                                                                        \
  do {                                                                                          \
    const cublasStatus_t kvc_s = (call);                                                        \
    if (kvc_s != CUBLAS_STATUS_SUCCESS)                                                         \
      return absl::InternalError(absl::StrCat(#call, " at ", __FILE__, ":", __LINE__, ": cuBLAS status ", \
                                              static_cast<int>(kvc_s)));                        \
  } while (0)

#define KVC_CUSOLVER(call)                                                                      \
  do {                                                                                          \
    const cusolverStatus_t kvc_s = (call);                                                      \
    if (kvc_s != CUSOLVER_STATUS_SUCCESS)                                                       \
      return absl::InternalError(absl::StrCat(#call, " at ", __FILE__, ":", __LINE__, ": cuSOLVER status ", \
                                              static_cast<int>(kvc_s)));                        \
  } while (0)
