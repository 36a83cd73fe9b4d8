#include "kernels/device_omp_gram.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"

namespace kvcompact::kernels {

absl::Status DeviceOmpGram::Reserve(int64_t pool, int64_t budget) {
  pool = std::max<int64_t>(pool, 1);
  budget = std::clamp<int64_t>(budget, 1, pool);
  if (auto s = index_.Reserve(2 * budget); !s.ok()) return s;
  if (auto s = vec_.Reserve(pool + budget); !s.ok()) return s;
  if (auto s = block_.Reserve(budget * budget); !s.ok()) return s;
  if (auto s = host_index_.Reserve(2 * budget); !s.ok()) return s;
  if (auto s = host_vec_.Reserve(pool + budget); !s.ok()) return s;
  if (auto s = host_block_.Reserve(budget * budget); !s.ok()) return s;
  pool_ = std::max(pool_, pool);
  budget_ = std::max(budget_, budget);
  return absl::OkStatus();
}

void DeviceOmpGram::Bind(const float* gram, int64_t P, cudaStream_t stream) {
  gram_ = gram;
  P_ = P;
  stream_ = stream;
  status_ = P <= pool_ ? absl::OkStatus()
                       : absl::InternalError(absl::StrCat("OMP pool of ", P, " keys over the reserved ", pool_));
}

bool DeviceOmpGram::Fail(absl::Status s) {
  if (status_.ok() && !s.ok()) status_ = std::move(s);
  return !status_.ok();
}

bool DeviceOmpGram::Fits(size_t indices, size_t block) {
  if (indices <= static_cast<size_t>(2 * budget_) && block <= static_cast<size_t>(budget_ * budget_)) return true;
  Fail(absl::InternalError(absl::StrCat("OMP read of ", indices, " indices over the reserved budget of ", budget_)));
  return false;
}

#define KVC_OMP(call)                                                       \
  do {                                                                      \
    const cudaError_t kvc_e = (call);                                       \
    if (kvc_e != cudaSuccess) return Fail(CudaStatus(kvc_e, #call, __FILE__, __LINE__)); \
  } while (0)

double DeviceOmpGram::MeanDiagonal() {
  if (!status_.ok() || P_ == 0) return 0;
  auto run = [&]() -> bool {
    SumGramDiagonal(gram_, P_, vec_.get(), stream_);
    KVC_OMP(cudaGetLastError());
    KVC_OMP(cudaMemcpyAsync(host_vec_.get(), vec_.get(), sizeof(double), cudaMemcpyDeviceToHost, stream_));
    KVC_OMP(cudaStreamSynchronize(stream_));
    return false;
  };
  return run() ? 0 : host_vec_.get()[0] / static_cast<double>(P_);
}

void DeviceOmpGram::Accumulate(const std::vector<int32_t>& cols, const VectorD& w, VectorD* into) {
  const int64_t k = static_cast<int64_t>(cols.size());
  if (k == 0 || !status_.ok() || !Fits(2 * cols.size(), 0)) return;  // the weights' room is one budget
  double* host_into = host_vec_.get();
  double* host_w = host_vec_.get() + P_;
  std::memcpy(host_index_.get(), cols.data(), k * sizeof(int32_t));
  std::memcpy(host_w, w.data(), k * sizeof(double));
  const bool zero = into->isZero(0);  // a refit starts from zero: nothing to send
  if (!zero) std::memcpy(host_into, into->data(), P_ * sizeof(double));
  auto run = [&]() -> bool {
    KVC_OMP(cudaMemcpyAsync(index_.get(), host_index_.get(), k * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    KVC_OMP(cudaMemcpyAsync(vec_.get() + P_, host_w, k * sizeof(double), cudaMemcpyHostToDevice, stream_));
    if (zero) {
      KVC_OMP(cudaMemsetAsync(vec_.get(), 0, P_ * sizeof(double), stream_));
    } else {
      KVC_OMP(cudaMemcpyAsync(vec_.get(), host_into, P_ * sizeof(double), cudaMemcpyHostToDevice, stream_));
    }
    AccumulateGramRows(gram_, P_, index_.get(), vec_.get() + P_, k, vec_.get(), stream_);
    KVC_OMP(cudaGetLastError());
    KVC_OMP(cudaMemcpyAsync(host_into, vec_.get(), P_ * sizeof(double), cudaMemcpyDeviceToHost, stream_));
    KVC_OMP(cudaStreamSynchronize(stream_));
    return false;
  };
  if (!run()) std::memcpy(into->data(), host_into, P_ * sizeof(double));
}

MatrixD DeviceOmpGram::Block(const std::vector<int32_t>& rows, const std::vector<int32_t>& cols) {
  const int64_t nr = static_cast<int64_t>(rows.size()), nc = static_cast<int64_t>(cols.size());
  MatrixD out = MatrixD::Zero(nr, nc);
  if (nr * nc == 0 || !status_.ok() || !Fits(rows.size() + cols.size(), rows.size() * cols.size())) return out;
  std::memcpy(host_index_.get(), rows.data(), nr * sizeof(int32_t));
  std::memcpy(host_index_.get() + nr, cols.data(), nc * sizeof(int32_t));
  auto run = [&]() -> bool {
    KVC_OMP(cudaMemcpyAsync(index_.get(), host_index_.get(), (nr + nc) * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    GatherGramBlock(gram_, P_, index_.get(), nr, index_.get() + nr, nc, block_.get(), stream_);
    KVC_OMP(cudaGetLastError());
    KVC_OMP(cudaMemcpyAsync(host_block_.get(), block_.get(), nr * nc * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    KVC_OMP(cudaStreamSynchronize(stream_));
    return false;
  };
  if (!run()) out = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(host_block_.get(), nr, nc).cast<double>();
  return out;
}

}  // namespace kvcompact::kernels
