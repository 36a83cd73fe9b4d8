#include "kernels/device_omp_gram.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/am_kernels.cuh"
#include "kernels/cuda_check.h"
#include "kernels/gemm.h"

namespace kvcompact::kernels {

absl::Status DeviceOmpGram::Reserve(int64_t pool, int64_t queries, int64_t budget) {
  // The buffers' layouts use the largest of each size reserved so far: sized from those, not from
  // this call's (a larger pool with a smaller budget must not shrink what a budget needs).
  pool_ = std::max({pool_, pool, int64_t{1}});
  queries_ = std::max({queries_, queries, int64_t{1}});
  budget_ = std::max(budget_, std::clamp<int64_t>(budget, 1, std::max<int64_t>(pool, 1)));
  if (auto s = index_.Reserve(2 * budget_); !s.ok()) return s;
  if (auto s = vec_.Reserve(pool_ + budget_ + queries_); !s.ok()) return s;
  if (auto s = gathered_.Reserve(2 * budget_ * queries_); !s.ok()) return s;
  if (auto s = block_.Reserve(budget_ * budget_); !s.ok()) return s;
  if (auto s = host_index_.Reserve(2 * budget_); !s.ok()) return s;
  if (auto s = host_vec_.Reserve(pool_ + budget_); !s.ok()) return s;
  return host_block_.Reserve(budget_ * budget_);
}

void DeviceOmpGram::Bind(const float* phi_t, int64_t P, int64_t n, cudaStream_t stream, cublasHandle_t blas) {
  phi_t_ = phi_t;
  P_ = P;
  n_ = n;
  stream_ = stream;
  blas_ = blas;
  status_ = P <= pool_ && n <= queries_
                ? absl::OkStatus()
                : absl::InternalError(absl::StrCat("OMP pool of ", P, " keys x ", n, " queries over the reserved ", pool_,
                                                   " x ", queries_));
}

bool DeviceOmpGram::Fail(absl::Status s) {
  if (status_.ok() && !s.ok()) status_ = std::move(s);
  return !status_.ok();
}

bool DeviceOmpGram::Within(size_t indices, int64_t max_indices) {
  if (static_cast<int64_t>(indices) <= max_indices) return true;
  Fail(absl::InternalError(absl::StrCat("OMP read of ", indices, " keys over the reserved budget of ", budget_)));
  return false;
}

// Inside the lambdas below: a failed call records its status and makes the lambda return true.
#define KVC_OMP(call)                                                                      \
  do {                                                                                     \
    const cudaError_t kvc_e = (call);                                                      \
    if (kvc_e != cudaSuccess) return Fail(CudaStatus(kvc_e, #call, __FILE__, __LINE__));   \
  } while (0)

double DeviceOmpGram::MeanDiagonal() {
  if (!status_.ok() || P_ == 0) return 0;
  auto failed = [&]() -> bool {
    SumOfSquares(phi_t_, P_, n_, vec_.get(), stream_);  // trace(Phi^T Phi)
    KVC_OMP(cudaGetLastError());
    KVC_OMP(cudaMemcpyAsync(host_vec_.get(), vec_.get(), sizeof(double), cudaMemcpyDeviceToHost, stream_));
    KVC_OMP(cudaStreamSynchronize(stream_));
    return false;
  };
  return failed() ? 0 : host_vec_.get()[0] / static_cast<double>(P_);
}

void DeviceOmpGram::Accumulate(const std::vector<int32_t>& cols, const VectorD& w, VectorD* into) {
  const int64_t k = static_cast<int64_t>(cols.size());
  if (k == 0 || !status_.ok() || !Within(cols.size(), budget_)) return;
  double* host_into = host_vec_.get();
  double* host_w = host_vec_.get() + P_;
  double* device_into = vec_.get();
  double* device_w = vec_.get() + P_;
  double* device_v = vec_.get() + P_ + budget_;  // Phi_S w over the n queries
  std::memcpy(host_index_.get(), cols.data(), k * sizeof(int32_t));
  std::memcpy(host_w, w.data(), k * sizeof(double));
  const bool zero = into->isZero(0);  // a refit starts from zero: nothing to send
  if (!zero) std::memcpy(host_into, into->data(), P_ * sizeof(double));
  auto failed = [&]() -> bool {
    KVC_OMP(cudaMemcpyAsync(index_.get(), host_index_.get(), k * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    KVC_OMP(cudaMemcpyAsync(device_w, host_w, k * sizeof(double), cudaMemcpyHostToDevice, stream_));
    if (zero) {
      KVC_OMP(cudaMemsetAsync(device_into, 0, P_ * sizeof(double), stream_));
    } else {
      KVC_OMP(cudaMemcpyAsync(device_into, host_into, P_ * sizeof(double), cudaMemcpyHostToDevice, stream_));
    }
    KVC_OMP(cudaMemsetAsync(device_v, 0, n_ * sizeof(double), stream_));
    AccumulateRows(phi_t_, n_, index_.get(), device_w, k, device_v, stream_);  // v = Phi_S w
    AddRowDots(phi_t_, P_, n_, device_v, device_into, stream_);               // into += Phi^T v
    KVC_OMP(cudaGetLastError());
    KVC_OMP(cudaMemcpyAsync(host_into, device_into, P_ * sizeof(double), cudaMemcpyDeviceToHost, stream_));
    KVC_OMP(cudaStreamSynchronize(stream_));
    return false;
  };
  if (!failed()) std::memcpy(into->data(), host_into, P_ * sizeof(double));
}

MatrixD DeviceOmpGram::Block(const std::vector<int32_t>& rows, const std::vector<int32_t>& cols) {
  const int64_t nr = static_cast<int64_t>(rows.size()), nc = static_cast<int64_t>(cols.size());
  MatrixD out = MatrixD::Zero(nr, nc);
  if (nr * nc == 0 || !status_.ok() || !Within(rows.size(), budget_) || !Within(cols.size(), budget_)) return out;
  std::memcpy(host_index_.get(), rows.data(), nr * sizeof(int32_t));
  std::memcpy(host_index_.get() + nr, cols.data(), nc * sizeof(int32_t));
  float* a = gathered_.get();
  float* b = gathered_.get() + nr * n_;
  auto failed = [&]() -> bool {
    KVC_OMP(cudaMemcpyAsync(index_.get(), host_index_.get(), (nr + nc) * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    GatherRows(phi_t_, index_.get(), nr, n_, a, stream_);
    GatherRows(phi_t_, index_.get() + nr, nc, n_, b, stream_);
    KVC_OMP(cudaGetLastError());
    if (absl::Status s = Gemm(blas_, nr, nc, n_, 1.f, {a, n_, 0, false}, {b, n_, 0, true}, 0.f, block_.get(), nc, 0, 1);
        !s.ok()) {
      return Fail(std::move(s));
    }
    KVC_OMP(cudaMemcpyAsync(host_block_.get(), block_.get(), nr * nc * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    KVC_OMP(cudaStreamSynchronize(stream_));
    return false;
  };
  if (!failed()) out = Eigen::Map<const MatrixF>(host_block_.get(), nr, nc).cast<double>();
  return out;
}

}  // namespace kvcompact::kernels
