// The CUDA backend's class, shared by its two sources: cuda_backend.cc (set-up, memory bounds, the
// device work of each stage) and cuda_steps.cc (the pipeline's steps, core/pipeline.h, built from
// that work). Internal to kernels/; the public interface is cuda_backend.h.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <numeric>
#include <optional>
#include <thread>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/budget.h"
#include "core/fit.h"
#include "core/pipeline.h"
#include "core/selection.h"
#include "kernels/am_kernels.cuh"
#include "kernels/cuda_backend.h"
#include "kernels/device_buffer.h"
#include "kernels/device_lsq.h"
#include "kernels/device_omp_gram.h"
#include "kernels/fused_attention.cuh"
#include "kernels/layer_inputs.h"
#include "kernels/gemm.h"
#include "kernels/head_lane.h"

namespace kvcompact::kernels::internal {

using Clock = std::chrono::steady_clock;
inline double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

template <typename T>
absl::Status ToDevice(DeviceBuffer<T>& buf, const T* host, size_t count, cudaStream_t s) {
  if (absl::Status st = buf.Reserve(std::max<size_t>(count, 1)); !st.ok()) return st;
  if (count) KVC_CUDA(cudaMemcpyAsync(buf.get(), host, count * sizeof(T), cudaMemcpyHostToDevice, s));
  return absl::OkStatus();
}

template <typename T>
absl::Status ToHost(T* host, const T* device, size_t count, cudaStream_t s) {
  if (count) KVC_CUDA(cudaMemcpyAsync(host, device, count * sizeof(T), cudaMemcpyDeviceToHost, s));
  KVC_CUDA(cudaStreamSynchronize(s));
  return absl::OkStatus();
}

inline ScoreReduceKind ToKind(ScoreReduce r) { return static_cast<ScoreReduceKind>(static_cast<int>(r)); }

// Attention statistics of one query set, on the device, for all heads.
struct DeviceStats {
  DeviceBuffer<float> row_max, mass, outputs;
};

DeviceBytes EstimateDeviceBytesImpl(const LayerJob& job, size_t workspace_bytes, int head_lanes);

class CudaBackend final : public Backend, private LayerSteps {
 public:
  explicit CudaBackend(const CudaBackendOptions& options) : options_(options), limit_(options.memory_limit_bytes) {}
  ~CudaBackend() override {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    if (solver_) cusolverDnDestroy(solver_);
    if (blas_) cublasDestroy(blas_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  absl::Status Init() {
    KVC_CUDA(cudaSetDevice(options_.device));
    KVC_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    KVC_CUBLAS(cublasCreate(&blas_));
    KVC_CUBLAS(cublasSetStream(blas_, stream_));
    // fp32 by default (the least-squares fits are sensitive to TF32); TF32 only when asked.
    KVC_CUBLAS(cublasSetMathMode(blas_, options_.allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_PEDANTIC_MATH));
    KVC_CUSOLVER(cusolverDnCreate(&solver_));
    KVC_CUSOLVER(cusolverDnSetStream(solver_, stream_));
    if (limit_ == 0) {
      size_t free = 0, total = 0;
      KVC_CUDA(cudaMemGetInfo(&free, &total));
      limit_ = free / 10 * 9;
    }
    limit_ = static_cast<size_t>(static_cast<double>(limit_) * std::clamp(options_.memory_share, 0.0, 1.0));
    lanes_.resize(std::max(1, options_.head_lanes));
    for (size_t i = 0; i < lanes_.size(); ++i) {
      lanes_[i] = std::make_unique<HeadLane>();
      absl::Status made = i == 0 ? lanes_[i]->Borrow(stream_, blas_, solver_)
                                 : lanes_[i]->Create(options_.allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_PEDANTIC_MATH);
      if (!made.ok()) return made;
    }
    lsq_ = std::make_unique<DeviceBoundedLsq>(blas_, stream_);
    if (auto s = lsq_->Init(); !s.ok()) return s;
    const int copy_threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 16u));
    if (auto s = inputs_.Init(options_.device, copy_threads, &account_); !s.ok()) return s;
    return absl::OkStatus();
  }

  std::string_view name() const override { return "cuda"; }
  size_t device_bytes_reserved() const override { return g_device_bytes.load(); }
  size_t device_bytes_peak() const override { return g_device_bytes_peak.load(); }

  absl::StatusOr<LayerResult> CompactLayer(const LayerJob& job) override {
    const DeviceAccountScope charged(&account_);
    absl::StatusOr<LayerResult> result = RunWithinLimit(job);
    if (!result.ok()) {
      // Leave no work in flight; a sticky error (the context is lost) makes the backend unhealthy.
      cudaError_t sync = cudaStreamSynchronize(stream_);
      for (size_t i = 1; i < lanes_.size(); ++i) {
        if (const cudaError_t e = cudaStreamSynchronize(lanes_[i]->stream); sync == cudaSuccess) sync = e;
      }
      const cudaError_t last = cudaGetLastError();
      if (result.status().code() == absl::StatusCode::kDataLoss || IsStickyCudaError(sync) || IsStickyCudaError(last)) {
        healthy_ = false;
      }
    }
    return result;
  }
  bool healthy() const override { return healthy_.load(); }
  // The pipeline's steps on this backend for `job` (which must outlive their use): Run's own, and
  // tests' (CudaStepsFor).
  LayerSteps& BindSteps(const LayerJob& job);
  absl::Status CheckFits(const LayerJob& job) const override {
    const DeviceBytes need = EstimateDeviceBytesImpl(job, options_.workspace_bytes, options_.head_lanes);
    if (HeadsThatFit(need) >= 1) return absl::OkStatus();
    return absl::ResourceExhaustedError(absl::StrCat(
        "layer ", job.data.layer, ": one KV head of ", job.data.tokens, " tokens needs about ",
        (need.fixed + need.per_head) >> 20, " MiB of GPU memory, over the bound of ", limit_ >> 20,
        " MiB; raise --cuda_memory_limit_bytes, lower --cuda_workspace_bytes or --cuda_layers_in_flight (each layer in ",
        "flight gets an equal share), or send fewer tokens or queries per layer"));
  }
  void Prefetch(std::shared_ptr<const LayerJob> job) override {
    // Only layers compacted in one piece: a layer split into head groups uploads per group.
    if (!healthy_ || static_cast<int64_t>(job->budgets.size()) != job->data.heads) return;
    const DeviceBytes need = EstimateDeviceBytesImpl(*job, options_.workspace_bytes, options_.head_lanes);
    if (need.fixed + job->data.heads * need.per_head <= limit_) inputs_.Prefetch(std::move(job));
  }

 private:
  absl::StatusOr<LayerResult> Run(const LayerJob& job);
  // Run on the whole layer, or on groups of heads when the layer does not fit memory_limit_bytes.
  absl::StatusOr<LayerResult> RunWithinLimit(const LayerJob& job);
  int64_t HeadsThatFit(const DeviceBytes& need) const {
    return limit_ > need.fixed ? static_cast<int64_t>((limit_ - need.fixed) / std::max<size_t>(need.per_head, 1)) : 0;
  }
  void ReleaseBuffers();
  absl::Status Stats(const float* queries, int64_t n, const std::optional<ScoreReduce>& reduce, DeviceStats* out);
  // Mass system of head h on the device (C_k in lane 0's ck): G = Phi^T Phi and c = Phi^T m, into the
  // solver's fp64 slots.
  absl::Status MassSystem(int64_t h, int64_t nf, int64_t t, const VectorF& bias_s, double prior, double* gram, double* rhs);
  // The same system in fp32 into lane 0's gram (t x t) and cvec (t), for the keys in its ck.
  absl::Status MassSystemF32(int64_t h, int64_t nf, int64_t t, const VectorF& bias_s);
  // Phi = exp(s Q K_S^T + b_S - M) (nf x t) into lane 0's subset, for the keys in its ck (fp32 products).
  absl::Status MassFeatures(int64_t h, int64_t nf, int64_t t, const VectorF& bias_s);
  // OMP's pool system without G: Phi^T (t x nf) into `phi_t` and c = Phi^T m into `rhs` (device).
  absl::Status PoolFeatures(int64_t h, int64_t nf, int64_t t, const VectorF& bias_s, float* phi_t, float* rhs);
  // The pipeline's steps (core/pipeline.h).
  BlockView Block(int64_t head) const override { return job_->data.HeadBlock(head); }
  // Uploads the layer (or takes its prefetched copy), then the statistics of both query sets.
  absl::Status Statistics(const CompactionPlan& plan, MatrixF* scores, StageSeconds* seconds) override;
  // OMP: each head's candidate-pool Gram system is built on the device (the part that reads the
  // queries) and stays there; the greedy loop (core/omp.h) runs on a host thread per head,
  // overlapping the device's work on the next head, and reads G on the device.
  absl::Status SelectOmp(const CompactionPlan& plan, const std::vector<int64_t>& heads, const MatrixF& scores,
                         std::vector<std::vector<int32_t>>* kept) override;
  // Bounded NNLS for the mass weights of the fitted heads, in batches whose solver memory fits the
  // workspace; beta = log w + b_S on the host.
  absl::Status FitMass(const CompactionPlan& plan, std::vector<CompactedHead>* heads, StageSeconds* seconds) override;
  // Per head on the device: values by the ridge solve, then the errors on both query sets (and
  // plain selection's), with no host synchronisation until every head is queued.
  absl::Status FitValuesAndEvaluate(const CompactionPlan& plan, const std::vector<CompactedHead>& selection,
                                    std::vector<CompactedHead>* heads, std::vector<HeadFigures>* figures,
                                    StageSeconds* seconds) override;
  // Values of head h (C_k and kept positions in the lane's ck and idx) by the ridge solve on the device, into `cv` (t x dv, device);
  // cuSOLVER's two info codes into `info` (device).
  absl::Status ValueFit(HeadLane& lane, int64_t h, int64_t nf, int64_t t, double ridge, const VectorF& beta, float* cv,
                        int* info);
  // Compacted outputs for n queries (device; `stride` queries per head in `truth`) against head h's
  // C_k (lane.ck), beta (lane.beta) and C_v (`cv`); the error sums of ErrorSums go to `sums` (device).
  absl::Status Evaluate(HeadLane& lane, const float* queries, int64_t n, int64_t stride, const DeviceStats& truth, int64_t h,
                        int64_t t, const float* cv, double* sums);
  // Both evaluations of head h: sums[0..2] on the fitting queries, sums[3..5] on the held-out ones.
  absl::Status EvaluateHead(HeadLane& lane, int64_t h, int64_t t, int64_t nf, int64_t ne, const float* cv, double* sums);

  CudaBackendOptions options_;
  size_t limit_ = 0;                // this backend's bound (its share of the device's)
  DeviceMemoryAccount account_{0};  // what its buffers hold (declared before them: they release into it)
  std::atomic<bool> healthy_{true};
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  cusolverDnHandle_t solver_ = nullptr;
  // Layer inputs and statistics.
  int64_t H_ = 0, T_ = 0, d_ = 0, dv_ = 0;
  float scale_ = 0;
  DType inputs_dtype_ = DType::kFloat32;
  bool has_bias_ = false;
  InputStager inputs_;
  const LayerJob* job_ = nullptr;    // the layer being compacted (during Run)
  const LayerInputs* in_ = nullptr;  // its inputs on the device (a slot of inputs_)
  DeviceBuffer<float> logits_, scores_, scores2_;
  DeviceBuffer<float> fused_ws_;  // 16-bit copies of Q, K and V for the fused statistics
  DeviceStats fit_, eval_;
  // A layer's small per-head uploads (kept positions, beta), staged in pinned memory: from pageable
  // memory cudaMemcpyAsync may wait for the stream, and the host could not queue the next head's
  // work while the device runs this one's. Reset at the start of each layer (the stream is idle).
  PinnedBuffer<char> stage_;
  size_t stage_used_ = 0;
  template <typename T>
  absl::Status Upload(DeviceBuffer<T>& buf, const T* host, size_t count, cudaStream_t stream);
  // Per-head fit buffers, a set per lane. Lane 0 runs on the backend's stream (the mass fit and OMP
  // use it); a layer's value fits and evaluations spread over all of them.
  std::vector<std::unique_ptr<HeadLane>> lanes_;
  HeadLane& MainLane() { return *lanes_[0]; }  // on stream_, blas_ and solver_
  DeviceBuffer<float> sel_cv_;    // every head's V_S, for the comparison with plain selection
  DeviceBuffer<double> sel_err_;  // and that one's error sums
  // Per layer: every head's C_v, cuSOLVER info codes and error sums, read back once at the end.
  DeviceBuffer<float> cv_all_;
  DeviceBuffer<int> info_all_;
  DeviceBuffer<double> err_all_;
  std::vector<cudaEvent_t> events_;
  std::unique_ptr<DeviceBoundedLsq> lsq_;
  // Per head of a layer's OMP selection: its pool's system [Phi^T | c] on the device, the greedy
  // loop's reads of G (on the head's own stream and cuBLAS handle), c on the host, and the event
  // of the system's completion.
  struct OmpHead {
    DeviceBuffer<float> system;
    DeviceOmpGram reads;
    PinnedBuffer<float> rhs;
    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;
    cudaEvent_t built = nullptr;
    ~OmpHead() {
      if (blas) cublasDestroy(blas);
      if (built) cudaEventDestroy(built);
      if (stream) cudaStreamDestroy(stream);
    }
  };
  std::vector<std::unique_ptr<OmpHead>> omp_heads_;
  // Long-lived host threads (one per core), instead of a thread per head and layer: the OMP
  // greedy loops, the per-head key selection.
  std::unique_ptr<ThreadPool> host_pool_;
};

template <typename T>
absl::Status CudaBackend::Upload(DeviceBuffer<T>& buf, const T* host, size_t count, cudaStream_t stream) {
  const size_t bytes = count * sizeof(T), at = (stage_used_ + 15) / 16 * 16;
  if (count == 0 || at + bytes > stage_.capacity()) return ToDevice(buf, host, count, stream);
  if (absl::Status st = buf.Reserve(count); !st.ok()) return st;
  std::memcpy(stage_.get() + at, host, bytes);
  KVC_CUDA(cudaMemcpyAsync(buf.get(), stage_.get() + at, bytes, cudaMemcpyHostToDevice, stream));
  stage_used_ = at + bytes;
  return absl::OkStatus();
}

}  // namespace kvcompact::kernels::internal
