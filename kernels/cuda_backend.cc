// CUDA backend: the steps of the pipeline in core/pipeline.h on the device. Per layer, all KV
// heads at once for the n x T work (logits, softmax statistics, key scores, outputs: the fused
// kernels, or strided-batched cuBLAS over heads with query chunks bounded by the workspace, so the
// n x T matrix never exists whole); per head for the t-sized fits (ragged budgets): subset logits,
// Phi^T Phi and Phi^T m on the GPU; the bounded NNLS for all heads at once on the GPU in fp64
// (kernels/device_lsq.h: the accelerated solver of core/bounded_lsq.h, every head in lockstep);
// X^T X and X^T Y on the GPU and the ridge solve by cuSOLVER Cholesky in fp32 (optionally heads
// over several streams, kernels/head_lane.h). Key selection runs in the pipeline on the host from
// the GPU's scores, so both backends pick the same keys; OMP's greedy loop (core/omp.h) runs on a
// host thread per head and reads its Gram matrix on the device from the pool's features.
#include "kernels/cuda_backend.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <numeric>
#include <optional>
#include <thread>
#include <cmath>
#include <vector>

#include "core/budget.h"
#include "core/fit.h"
#include "core/pipeline.h"
#include "core/selection.h"
#include "kernels/am_kernels.cuh"
#include "kernels/device_buffer.h"
#include "kernels/device_lsq.h"
#include "kernels/device_omp_gram.h"
#include "kernels/fused_attention.cuh"
#include "kernels/layer_inputs.h"
#include "kernels/gemm.h"
#include "kernels/head_lane.h"

namespace kvcompact::kernels {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

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

ScoreReduceKind ToKind(ScoreReduce r) { return static_cast<ScoreReduceKind>(static_cast<int>(r)); }

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
  absl::Status Statistics(const LayerPlan& plan, MatrixF* scores, StageSeconds* seconds) override;
  // OMP: each head's candidate-pool Gram system is built on the device (the part that reads the
  // queries) and stays there; the greedy loop (core/omp.h) runs on a host thread per head,
  // overlapping the device's work on the next head, and reads G on the device.
  absl::Status SelectOmp(const LayerPlan& plan, const std::vector<int64_t>& heads, const MatrixF& scores,
                         std::vector<std::vector<int32_t>>* kept) override;
  // Bounded NNLS for the mass weights of the fitted heads, in batches whose solver memory fits the
  // workspace; beta = log w + b_S on the host.
  absl::Status FitMass(const LayerPlan& plan, std::vector<CompactedHead>* heads, StageSeconds* seconds) override;
  // Per head on the device: values by the ridge solve, then the errors on both query sets (and
  // plain selection's), with no host synchronisation until every head is queued.
  absl::Status FitValuesAndEvaluate(const LayerPlan& plan, const std::vector<CompactedHead>& selection,
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

absl::Status CudaBackend::Stats(const float* queries, int64_t n, const std::optional<ScoreReduce>& reduce,
                                DeviceStats* out) {
  if (auto s = out->row_max.Reserve(H_ * n); !s.ok()) return s;
  if (auto s = out->mass.Reserve(H_ * n); !s.ok()) return s;
  if (auto s = out->outputs.Reserve(H_ * n * dv_); !s.ok()) return s;
  // A composite score (core/attention.h) accumulates the RMS into scores_ and its second part into
  // scores2_, on the unfused path only.
  const bool composite = reduce && IsCompositeScore(*reduce);
  if (reduce) {
    if (auto s = scores_.Reserve(H_ * T_); !s.ok()) return s;
  }
  if (composite) {
    if (auto s = scores2_.Reserve(H_ * T_); !s.ok()) return s;
    KVC_CUDA(cudaMemsetAsync(scores2_.get(), 0, H_ * T_ * sizeof(float), stream_));
  }
  const std::optional<ScoreReduceKind> kind =
      !reduce ? std::nullopt : std::optional(composite ? ScoreReduceKind::kRms : ToKind(*reduce));
  // With tensor-core math allowed and inputs that arrived in bf16 or fp16, the fused kernels: the
  // logits never reach device memory.
  if (options_.allow_tf32 && options_.fused_stats && FusedStatsSupported(inputs_dtype_, d_, dv_) && n > 0 && !composite) {
    if (auto s = fused_ws_.Reserve(FusedStatsWorkspaceBytes(H_, n, T_, d_, dv_) / sizeof(float) + 1); !s.ok()) return s;
    if (FusedAttentionStats(inputs_dtype_, queries, n, in_->keys.get(), in_->values.get(),
                            has_bias_ ? in_->bias.get() : nullptr, H_, T_, d_, dv_, scale_, out->row_max.get(),
                            out->mass.get(), out->outputs.get(), reduce ? std::optional(ToKind(*reduce)) : std::nullopt,
                            scores_.get(), fused_ws_.get(), stream_)) {
      KVC_LAUNCHED("FusedAttentionStats");
      return absl::OkStatus();
    }
  }
  const int64_t per_row = H_ * T_;
  const int64_t chunk = std::clamp<int64_t>(static_cast<int64_t>(options_.workspace_bytes / sizeof(float)) / per_row, 1, n);
  if (auto s = logits_.Reserve(chunk * per_row); !s.ok()) return s;
  if (reduce) {
    KVC_CUDA(cudaMemsetAsync(scores_.get(), 0, H_ * T_ * sizeof(float), stream_));
  }
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    // L[h] = s Q[h][r0:r0+rows] K[h]^T          (rows x T per head)
    if (auto s = Gemm(blas_, rows, T_, d_, scale_, {queries + r0 * d_, d_, n * d_, false}, {in_->keys.get(), d_, T_ * d_, true},
                      0.f, logits_.get(), T_, rows * T_, H_);
        !s.ok()) {
      return s;
    }
    SoftmaxWithScores(logits_.get(), H_, rows, T_, has_bias_ ? in_->bias.get() : nullptr, T_, out->row_max.get() + r0,
                      out->mass.get() + r0, n, kind, scores_.get(), stream_,
                      composite && *reduce == ScoreReduce::kRmsMax ? scores2_.get() : nullptr,
                      composite && *reduce != ScoreReduce::kRmsMax ? scores2_.get() : nullptr);
    KVC_LAUNCHED("SoftmaxWithScores");
    // Y[h][r0:r0+rows] = A V[h]                  (rows x dv per head)
    if (auto s = Gemm(blas_, rows, dv_, T_, 1.f, {logits_.get(), T_, rows * T_, false}, {in_->values.get(), dv_, T_ * dv_, false},
                      0.f, out->outputs.get() + r0 * dv_, dv_, n * dv_, H_);
        !s.ok()) {
      return s;
    }
  }
  if (reduce) {
    FinalizeScores(scores_.get(), H_ * T_, n, *kind, stream_);
    KVC_LAUNCHED("FinalizeScores");
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::MassSystem(int64_t h, int64_t nf, int64_t t, const VectorF& bias_s, double prior, double* gram,
                                     double* rhs) {
  HeadLane& l0 = MainLane();
  if (auto s = MassSystemF32(h, nf, t, bias_s); !s.ok()) return s;
  CastToDouble(l0.gram.get(), t * t, gram, stream_);
  CastToDouble(l0.cvec.get(), t, rhs, stream_);
  KVC_LAUNCHED("CastToDouble");
  AddPriorTowardOne(gram, rhs, t, prior, stream_);
  KVC_LAUNCHED("AddPriorTowardOne");
  return absl::OkStatus();
}

namespace {

// cuBLAS math mode for a scope, restored after.
class ScopedMathMode {
 public:
  ScopedMathMode(cublasHandle_t handle, cublasMath_t mode) : handle_(handle) {
    cublasGetMathMode(handle_, &previous_);
    cublasSetMathMode(handle_, mode);
  }
  ~ScopedMathMode() { cublasSetMathMode(handle_, previous_); }

 private:
  cublasHandle_t handle_;
  cublasMath_t previous_ = CUBLAS_DEFAULT_MATH;
};

}  // namespace

absl::Status CudaBackend::MassFeatures(int64_t h, int64_t nf, int64_t t, const VectorF& bias_s) {
  HeadLane& l0 = MainLane();
  if (auto s = Gemm(blas_, nf, t, d_, scale_, {in_->q_fit.get() + h * nf * d_, d_, 0, false}, {l0.ck.get(), d_, 0, true}, 0.f,
                    l0.subset.get(), t, 0, 1);
      !s.ok()) {
    return s;
  }
  if (auto s = Upload(l0.beta, bias_s.data(), t, stream_); !s.ok()) return s;
  ExpShifted(l0.subset.get(), nf, t, l0.beta.get(), fit_.row_max.get() + h * nf, stream_);
  KVC_LAUNCHED("ExpShifted");
  return absl::OkStatus();
}

absl::Status CudaBackend::MassSystemF32(int64_t h, int64_t nf, int64_t t, const VectorF& bias_s) {
  HeadLane& l0 = MainLane();
  // Phi = exp(s Q K_S^T + b_S - M)   (nf x t);  G = Phi^T Phi;  c = Phi^T m  (fp32 products, as on
  // the CPU; the solvers work in fp64). Always plain fp32, also with --allow_tf32: built from TF32
  // products the system sent the bounded NNLS to its iteration bound on 208 of 256 BENCH-A heads
  // at T = 120,000, t = 2,400 (2 s per layer instead of 0.16 s), for a few percent of the layer's
  // time saved.
  ScopedMathMode fp32(blas_, CUBLAS_PEDANTIC_MATH);
  if (auto s = MassFeatures(h, nf, t, bias_s); !s.ok()) return s;
  if (auto s = Gemm(blas_, t, t, nf, 1.f, {l0.subset.get(), t, 0, true}, {l0.subset.get(), t, 0, false}, 0.f, l0.gram.get(), t,
                    0, 1);
      !s.ok()) {
    return s;
  }
  return Gemm(blas_, t, 1, nf, 1.f, {l0.subset.get(), t, 0, true}, {fit_.mass.get() + h * nf, 1, 0, false}, 0.f,
              l0.cvec.get(), 1, 0, 1);
}

absl::Status CudaBackend::PoolFeatures(int64_t h, int64_t nf, int64_t t, const VectorF& bias_s, float* phi_t,
                                       float* rhs) {
  HeadLane& l0 = MainLane();
  ScopedMathMode fp32(blas_, CUBLAS_PEDANTIC_MATH);  // as MassSystemF32
  if (auto s = MassFeatures(h, nf, t, bias_s); !s.ok()) return s;
  if (auto s = Gemm(blas_, t, 1, nf, 1.f, {l0.subset.get(), t, 0, true}, {fit_.mass.get() + h * nf, 1, 0, false}, 0.f,
                    rhs, 1, 0, 1);
      !s.ok()) {
    return s;
  }
  // Phi (nf x t row-major) is t x nf column-major; its transpose, nf x t column-major, is Phi^T
  // row-major.
  const float one = 1.f, zero = 0.f;
  KVC_CUBLAS(cublasSgeam(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(nf), static_cast<int>(t), &one, l0.subset.get(),
                         static_cast<int>(t), &zero, phi_t, static_cast<int>(nf), phi_t, static_cast<int>(nf)));
  return absl::OkStatus();
}

absl::Status CudaBackend::SelectOmp(const LayerPlan& plan, const std::vector<int64_t>& heads, const MatrixF& scores,
                                    std::vector<std::vector<int32_t>>* kept) {
  HeadLane& l0 = MainLane();
  const int64_t nf = in_->nf;
  while (omp_heads_.size() < heads.size()) {
    auto head = std::make_unique<OmpHead>();
    KVC_CUDA(cudaStreamCreateWithFlags(&head->stream, cudaStreamNonBlocking));
    KVC_CUDA(cudaEventCreateWithFlags(&head->built, cudaEventDisableTiming));
    KVC_CUBLAS(cublasCreate(&head->blas));
    KVC_CUBLAS(cublasSetStream(head->blas, head->stream));
    KVC_CUBLAS(cublasSetMathMode(head->blas, CUBLAS_PEDANTIC_MATH));
    omp_heads_.push_back(std::move(head));
  }
  // Host side first: each head's candidate pool (top RMS attention) and loop parameters.
  std::vector<std::vector<int32_t>> pools(heads.size());
  std::vector<OmpParams> params(heads.size());
  int64_t p_max = 1;
  for (size_t k = 0; k < heads.size(); ++k) {
    const HeadPlan& p = plan.heads[heads[k]];
    pools[k] = OmpCandidates(VectorF(scores.row(heads[k]).transpose()), T_, p.t, p.options.omp_pool);
    params[k] = OmpParamsFor(p.options, *plan.spec, p.t);
    p_max = std::max<int64_t>(p_max, static_cast<int64_t>(pools[k].size()));
  }
  // Every buffer before anything is queued: no allocation (an implicit synchronisation) while
  // loops run, and all of them charged to this backend's account by this thread.
  // The pool's keys, biases and features (nf x P; no P x P Gram matrix).
  for (auto [buf, count] : {std::pair{&l0.ck, p_max * d_}, {&l0.beta, p_max}, {&l0.subset, std::max<int64_t>(nf, 1) * p_max}}) {
    if (auto s = buf->Reserve(count); !s.ok()) return s;
  }
  if (auto s = l0.idx.Reserve(p_max); !s.ok()) return s;
  for (size_t k = 0; k < heads.size(); ++k) {
    const int64_t P = static_cast<int64_t>(pools[k].size());
    OmpHead& oh = *omp_heads_[k];
    if (auto s = oh.system.Reserve(P * nf + P); !s.ok()) return s;
    if (auto s = oh.rhs.Reserve(P); !s.ok()) return s;
    if (auto s = oh.reads.Reserve(P, nf, params[k].budget); !s.ok()) return s;
  }
  // Device side, queued back to back: head k's pool system [Phi^T (P x nf) | c (P)] into its own
  // buffer, c copied to the host, an event. A pool thread per head waits for the event and runs
  // the greedy loop, whose reads of G = Phi^T Phi run on the device on the head's own stream.
  std::vector<std::future<absl::StatusOr<std::vector<int32_t>>>> loops;
  absl::Status status;
  for (size_t k = 0; k < heads.size() && status.ok(); ++k) {
    const int64_t h = heads[k], P = static_cast<int64_t>(pools[k].size());
    const BlockView block = Block(h);
    VectorF bias_p(P);
    for (int64_t j = 0; j < P; ++j) bias_p[j] = block.bias ? block.bias[pools[k][j]] : 0.f;
    OmpHead& oh = *omp_heads_[k];
    status = ToDevice(l0.idx, pools[k].data(), P, stream_);
    if (!status.ok()) break;
    GatherRows(in_->keys.get() + h * T_ * d_, l0.idx.get(), P, d_, l0.ck.get(), stream_);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
      status = absl::InternalError(absl::StrCat("GatherRows(pool): ", cudaGetErrorString(e)));
      break;
    }
    status = PoolFeatures(h, nf, P, bias_p, oh.system.get(), oh.system.get() + P * nf);
    if (!status.ok()) break;
    if (cudaError_t e = cudaMemcpyAsync(oh.rhs.get(), oh.system.get() + P * nf, P * sizeof(float), cudaMemcpyDeviceToHost,
                                        stream_);
        e != cudaSuccess) {
      status = absl::InternalError(absl::StrCat("copy of the OMP right-hand side: ", cudaGetErrorString(e)));
      break;
    }
    if (cudaError_t e = cudaEventRecord(oh.built, stream_); e != cudaSuccess) {  // no early return: loops run
      status = CudaStatus(e, "cudaEventRecord(OMP system)", __FILE__, __LINE__);
      break;
    }
    auto selected = std::make_shared<std::promise<absl::StatusOr<std::vector<int32_t>>>>();
    loops.push_back(selected->get_future());
    host_pool_->Submit([selected, &oh, params = params[k], P, nf, pool = std::move(pools[k])] {
      if (cudaError_t e = cudaEventSynchronize(oh.built); e != cudaSuccess) {
        selected->set_value(CudaStatus(e, "cudaEventSynchronize(OMP system)", __FILE__, __LINE__));
        return;
      }
      const VectorD c = ConstVectorMapF(oh.rhs.get(), P).cast<double>();
      oh.reads.Bind(oh.system.get(), P, nf, oh.stream, oh.blas);
      const OmpResult r = ::kvcompact::SelectOmp(oh.reads, c, params);
      if (!oh.reads.status().ok()) {
        selected->set_value(oh.reads.status());
        return;
      }
      selected->set_value(SelectedPositions(r, pool));
    });
  }
  // Every started loop is joined (they read the heads' buffers) before returning, even on errors.
  for (size_t k = 0; k < loops.size(); ++k) {
    absl::StatusOr<std::vector<int32_t>> got = loops[k].get();
    if (!got.ok()) {
      if (status.ok()) status = absl::Status(got.status().code(), absl::StrCat("head ", heads[k], ": OMP selection: ",
                                                                                got.status().message()));
      continue;
    }
    (*kept)[heads[k]] = *std::move(got);
    if (status.ok() && (*kept)[heads[k]].size() != static_cast<size_t>(params[k].budget)) {
      status = absl::InternalError(absl::StrCat("head ", heads[k], ": OMP selection did not complete"));
    }
  }
  return status;
}

absl::Status CudaBackend::ValueFit(HeadLane& lane, int64_t h, int64_t nf, int64_t t, double ridge, const VectorF& beta, float* cv,
                                   int* info) {
  // X = softmax(s Q K_S^T + beta);  (X^T X + lambda I) C_v = X^T Y  by Cholesky. No host
  // synchronisation: cuSOLVER's info codes go to `info` (two ints) and are checked per layer.
  if (auto s = Upload(lane.beta, beta.data(), t, lane.stream); !s.ok()) return s;
  if (auto s = Gemm(lane.blas, nf, t, d_, scale_, {in_->q_fit.get() + h * nf * d_, d_, 0, false}, {lane.ck.get(), d_, 0, true}, 0.f,
                    lane.subset.get(), t, 0, 1);
      !s.ok()) {
    return s;
  }
  RowSoftmaxStats(lane.subset.get(), 1, nf, t, lane.beta.get(), 0, nullptr, nullptr, 0, lane.stream);
  KVC_LAUNCHED("RowSoftmaxStats(X)");
  if (auto s = Gemm(lane.blas, t, t, nf, 1.f, {lane.subset.get(), t, 0, true}, {lane.subset.get(), t, 0, false}, 0.f, lane.gram.get(), t, 0, 1);
      !s.ok()) {
    return s;
  }
  // Y^T X (dv x t, row-major) is X^T Y in column-major, the layout cuSOLVER wants for the right-hand sides.
  if (auto s = Gemm(lane.blas, dv_, t, nf, 1.f, {fit_.outputs.get() + h * nf * dv_, dv_, 0, true}, {lane.subset.get(), t, 0, false},
                    0.f, lane.rhs.get(), t, 0, 1);
      !s.ok()) {
    return s;
  }
  // Ridge toward the selection's values V[S] (lane.idx holds this head's kept positions).
  AddRidgeTowardRows(lane.gram.get(), lane.rhs.get(), in_->values.get() + h * T_ * dv_, lane.idx.get(), t, dv_,
                     static_cast<float>(ridge), lane.stream);
  KVC_LAUNCHED("AddRidgeTowardRows");
  int lwork = 0;
  KVC_CUSOLVER(cusolverDnSpotrf_bufferSize(lane.solver, CUBLAS_FILL_MODE_LOWER, static_cast<int>(t), lane.gram.get(),
                                           static_cast<int>(t), &lwork));
  if (auto s = lane.work.Reserve(std::max(lwork, 1)); !s.ok()) return s;
  KVC_CUSOLVER(cusolverDnSpotrf(lane.solver, CUBLAS_FILL_MODE_LOWER, static_cast<int>(t), lane.gram.get(), static_cast<int>(t),
                                lane.work.get(), lwork, info));
  KVC_CUSOLVER(cusolverDnSpotrs(lane.solver, CUBLAS_FILL_MODE_LOWER, static_cast<int>(t), static_cast<int>(dv_), lane.gram.get(),
                                static_cast<int>(t), lane.rhs.get(), static_cast<int>(t), info + 1));
  // C_v (t x dv, row-major) = the transpose of the column-major solution.
  const float one = 1.f, zero = 0.f;
  KVC_CUBLAS(cublasSgeam(lane.blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(dv_), static_cast<int>(t), &one, lane.rhs.get(),
                         static_cast<int>(t), &zero, cv, static_cast<int>(dv_), cv, static_cast<int>(dv_)));
  return absl::OkStatus();
}

absl::Status CudaBackend::EvaluateHead(HeadLane& lane, int64_t h, int64_t t, int64_t nf, int64_t ne, const float* cv, double* sums) {
  // The fit error on at most kFitErrorQueries fitting queries; the held-out error on the held-out
  // queries (on all fitting queries when none are held out).
  const int64_t nf_err = std::min<int64_t>(nf, kFitErrorQueries);
  if (auto s = Evaluate(lane, in_->q_fit.get() + h * nf * d_, nf_err, nf, fit_, h, t, cv, sums); !s.ok()) return s;
  if (ne > 0) return Evaluate(lane, in_->q_eval.get() + h * ne * d_, ne, ne, eval_, h, t, cv, sums + 3);
  return Evaluate(lane, in_->q_fit.get() + h * nf * d_, nf, nf, fit_, h, t, cv, sums + 3);
}

absl::Status CudaBackend::Evaluate(HeadLane& lane, const float* queries, int64_t n, int64_t stride, const DeviceStats& truth, int64_t h,
                                   int64_t t, const float* cv, double* sums) {
  // L = s Q C_k^T + beta; softmax with the compacted rows' own maxima M_S (so that keys far below
  // the full row's maximum M do not underflow); Y_hat = softmax(L) C_v; m_hat = exp(M_S - M) *
  // sum exp(L - M_S), formed in fp64 in ErrorSums. M_S goes to lane.cvec (free during evaluation).
  if (auto s = Gemm(lane.blas, n, t, d_, scale_, {queries, d_, 0, false}, {lane.ck.get(), d_, 0, true}, 0.f, lane.subset.get(), t, 0, 1);
      !s.ok()) {
    return s;
  }
  RowSoftmaxStats(lane.subset.get(), 1, n, t, lane.beta.get(), 0, lane.cvec.get(), lane.mhat.get(), 0, lane.stream);
  KVC_LAUNCHED("RowSoftmaxStats(eval)");
  if (auto s = Gemm(lane.blas, n, dv_, t, 1.f, {lane.subset.get(), t, 0, false}, {cv, dv_, 0, false}, 0.f, lane.yhat.get(), dv_, 0, 1);
      !s.ok()) {
    return s;
  }
  ErrorSums(lane.yhat.get(), truth.outputs.get() + h * stride * dv_, n, dv_, lane.mhat.get(), truth.mass.get() + h * stride, sums,
            lane.stream, lane.cvec.get(), truth.row_max.get() + h * stride);
  KVC_LAUNCHED("ErrorSums");
  return absl::OkStatus();
}

DeviceBytes EstimateDeviceBytesImpl(const LayerJob& job, size_t workspace_bytes, int head_lanes) {
  const LayerData& d = job.data;
  const int64_t T = d.tokens, n = std::max<int64_t>(d.queries, 1);
  int64_t t = 1;
  for (int64_t b : job.budgets) t = std::max(t, KeptKeys(b, T));
  const int64_t wide = std::max(d.head_dim, d.value_dim);
  int64_t pool = t;  // the widest per-head fit buffers: the budget, or OMP's candidate pool
  size_t omp_per_head = 0;
  if (GetMethodSpec(job.options.method).selection == Selection::kOmp) {
    for (int64_t b : job.budgets) pool = std::max(pool, OmpPoolSize(job.options.omp_pool, KeptKeys(b, T), T));
    // Kept on the device while each head's greedy loop runs: Phi^T and c, the reads' gathered
    // rows, block and vectors (DeviceOmpGram::Reserve). No pool x pool matrix is formed.
    omp_per_head = sizeof(float) * static_cast<size_t>(pool * n + pool + 2 * t * n + t * t) +
                   sizeof(double) * static_cast<size_t>(pool + t + n) + sizeof(int32_t) * static_cast<size_t>(2 * t);
  }
  // A composite key score's second accumulator (core/attention.h).
  const bool composite = job.options.score && IsCompositeScore(*job.options.score);
  DeviceBytes bytes;
  // Per head: K, V, bias and queries in two input slots (the next layer uploads while this one
  // computes); scores; row max, mass and outputs of both query sets; at least one logit row; the
  // fused statistics' 16-bit copies; bf16 inputs on their way in (two slots).
  bytes.per_head = sizeof(float) * static_cast<size_t>(2 * T * (d.head_dim + d.value_dim + 1) + 2 * T + 2 * n * d.head_dim +
                                                       n * (2 + d.value_dim)) +
                   FusedStatsWorkspaceBytes(1, n, T, d.head_dim, d.value_dim) +
                   2 * sizeof(uint16_t) * static_cast<size_t>(std::max(T, n) * wide) + omp_per_head +
                   (composite ? sizeof(float) * static_cast<size_t>(T) : 0);
  // Per layer: the logit workspace, one head's fit buffers (keys and features pool-sized, the
  // t x t systems budget-sized), the NNLS batch (bounded by the workspace but at least one head),
  // the Cholesky workspace of the value fit.
  bytes.fixed = workspace_bytes +
                sizeof(float) * static_cast<size_t>(5 * std::max(pool * wide, n) + n * pool + 2 * t * t + t * d.value_dim +
                                                    n * d.value_dim) +
                std::max(workspace_bytes, DeviceBoundedLsq::BytesFor({t})) + (size_t{64} << 20);
  // The other lanes' head buffers (the value fits and evaluations of a layer's heads overlap).
  const int64_t lanes = std::clamp<int64_t>(head_lanes, 1, std::max<int64_t>(d.heads, 1));
  bytes.fixed += static_cast<size_t>(lanes - 1) * HeadLane::BytesFor(t, n, d.head_dim, d.value_dim);
  return bytes;
}

absl::StatusOr<LayerResult> CudaBackend::RunWithinLimit(const LayerJob& job) {
  if (static_cast<int64_t>(job.budgets.size()) != job.data.heads) return absl::InvalidArgumentError("one budget per head is required");
  const DeviceBytes need = EstimateDeviceBytesImpl(job, options_.workspace_bytes, options_.head_lanes);
  const int64_t H = job.data.heads;
  const int64_t fit = HeadsThatFit(need);
  if (fit < 1) return CheckFits(job);
  const int64_t group = std::min(H, fit);
  // Grow-only buffers shaped by earlier layers may not leave room for this one: start afresh.
  if (account_.load() + need.fixed + group * need.per_head > limit_) ReleaseBuffers();
  if (group == H) return Run(job);
  LayerResult all;
  for (int64_t begin = 0; begin < H; begin += group) {
    absl::StatusOr<LayerResult> part = Run(SliceHeads(job, begin, std::min(H, begin + group)));
    if (!part.ok()) return part.status();
    for (CompactedHead& head : part->heads) all.heads.push_back(std::move(head));
    all.seconds += part->seconds;
  }
  return all;
}

void CudaBackend::ReleaseBuffers() {
  inputs_.Release();
  for (auto* b : {&logits_, &scores_, &scores2_, &fused_ws_, &fit_.row_max, &fit_.mass,
                  &fit_.outputs, &eval_.row_max, &eval_.mass, &eval_.outputs, &sel_cv_}) {
    b->Release();
  }
  sel_err_.Release();
  for (auto& lane : lanes_) lane->Release();
  omp_heads_.clear();  // no loop runs here: SelectOmp joins them before it returns
  lsq_->Release();
}

absl::Status CudaBackend::Statistics(const LayerPlan& plan, MatrixF* scores, StageSeconds* seconds) {
  auto start = Clock::now();
  absl::StatusOr<const LayerInputs*> inputs = inputs_.Acquire(*job_);
  if (!inputs.ok()) return inputs.status();
  in_ = *inputs;
  KVC_CUDA(cudaStreamSynchronize(stream_));
  // Room for every head's uploads of this layer: kept positions twice, beta three times.
  size_t stage_bytes = 4096;
  for (const HeadPlan& p : plan.heads) stage_bytes += 5 * (16 + p.t * sizeof(float));
  if (auto s = stage_.Reserve(stage_bytes); !s.ok()) return s;
  stage_used_ = 0;
  seconds->upload += Since(start);

  if (auto s = Stats(in_->q_fit.get(), in_->nf, plan.reduce, &fit_); !s.ok()) return s;
  if (plan.reduce) {
    scores->resize(H_, T_);
    if (auto s = ToHost(scores->data(), scores_.get(), H_ * T_, stream_); !s.ok()) return s;
  }
  if (plan.reduce && IsCompositeScore(*plan.reduce)) {
    MatrixF second(H_, T_);
    if (auto s = ToHost(second.data(), scores2_.get(), H_ * T_, stream_); !s.ok()) return s;
    host_pool_->ParallelFor(H_, [&](int64_t h) {
      scores->row(h) = CompositeScores(*plan.reduce, scores->row(h).transpose(), second.row(h).transpose()).transpose();
    });
  }
  KVC_CUDA(cudaStreamSynchronize(stream_));
  seconds->score += Since(start);
  if (in_->ne > 0) {
    start = Clock::now();
    if (auto s = Stats(in_->q_eval.get(), in_->ne, std::nullopt, &eval_); !s.ok()) return s;
    KVC_CUDA(cudaStreamSynchronize(stream_));
    seconds->evaluate += Since(start);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::FitMass(const LayerPlan& plan, std::vector<CompactedHead>* result, StageSeconds* seconds) {
  const auto start = Clock::now();
  const std::vector<int64_t> heads = plan.FittedHeads();
  const int64_t nf = in_->nf, n_max = std::max<int64_t>({in_->nf, in_->ne, 1});
  for (size_t first = 0; first < heads.size();) {
    // The largest run of heads whose solver memory fits the workspace (at least one head).
    std::vector<int64_t> sizes;
    size_t last = first;
    while (last < heads.size()) {
      sizes.push_back(plan.heads[heads[last]].t);
      if (sizes.size() > 1 && DeviceBoundedLsq::BytesFor(sizes) > options_.workspace_bytes) {
        sizes.pop_back();
        break;
      }
      ++last;
    }
    std::vector<LsqBounds> bounds;
    for (size_t k = first; k < last; ++k) {
      const HeadOptions& o = plan.heads[heads[k]].options;
      const auto [w_lo, w_hi] = WeightBounds(o, *plan.spec);
      const int cap = options_.mass_fit_max_iterations > 0
                          ? options_.mass_fit_max_iterations
                          : MassFitAcceleratedIterations(sizes[k - first], in_->distinct_fit.at(heads[k]));
      bounds.push_back({sizes[k - first], w_lo, w_hi, cap});
    }
    if (auto s = lsq_->Reset(bounds); !s.ok()) return s;
    for (size_t k = first; k < last; ++k) {
      const int64_t h = heads[k], t = sizes[k - first];
      const int i = static_cast<int>(k - first);
      const CompactedHead& head = (*result)[h];  // the selection: beta = b_S
      HeadLane& l0 = MainLane();
      if (auto s = l0.Reserve(t, n_max, d_, dv_); !s.ok()) return s;
      if (auto s = Upload(l0.idx, head.indices.data(), t, stream_); !s.ok()) return s;
      GatherRows(in_->keys.get() + h * T_ * d_, l0.idx.get(), t, d_, l0.ck.get(), stream_);
      KVC_LAUNCHED("GatherRows");
      const double prior = MassPrior(plan.heads[h].options, t, in_->distinct_fit.at(h));
      if (auto s = MassSystem(h, nf, t, head.beta, prior, lsq_->gram(i), lsq_->rhs(i)); !s.ok()) {
        return absl::Status(s.code(), absl::StrCat("head ", h, ": ", s.message()));
      }
    }
    const auto solve_start = Clock::now();
    std::vector<LsqOutcome> outcomes;
    const MassFitSolver chosen = plan.heads[heads[first]].options.mass_fit_solver;  // the layer's heads share it
    if (chosen == MassFitSolver::kNewton || (chosen == MassFitSolver::kBackendDefault && options_.mass_fit_newton)) {
      BoundedLsqOptions solver = MassFitSolverOptions();
      if (options_.mass_fit_max_iterations > 0) solver.max_iterations = options_.mass_fit_max_iterations;
      if (auto s = lsq_->Solve(solver, &outcomes); !s.ok()) return s;
    } else {
      if (auto s = lsq_->SolveAccelerated(AcceleratedLsqOptions(), &outcomes); !s.ok()) return s;  // caps per head
    }
    for (size_t k = first; k < last; ++k) {
      const int64_t h = heads[k], t = sizes[k - first];
      std::vector<double> w(t);
      if (auto s = ToHost(w.data(), lsq_->weights(static_cast<int>(k - first)), t, stream_); !s.ok()) return s;
      CompactedHead& head = (*result)[h];
      for (int64_t j = 0; j < t; ++j) head.beta[j] += static_cast<float>(std::log(w[j]));  // b_S + log w
      head.mass_fit_converged = outcomes[k - first].converged;
      head.mass_fit_iterations = outcomes[k - first].iterations;
    }
    seconds->mass_solve += Since(solve_start);
    first = last;
  }
  seconds->mass_fit += Since(start);
  return absl::OkStatus();
}

absl::Status CudaBackend::FitValuesAndEvaluate(const LayerPlan& plan, const std::vector<CompactedHead>& selection,
                                               std::vector<CompactedHead>* result, std::vector<HeadFigures>* figures,
                                               StageSeconds* seconds) {
  const int64_t nf = in_->nf, ne = in_->ne, n_max = std::max<int64_t>({nf, ne, 1});
  // Head h runs on lane h mod L (each lane's stream waits for the mass fit, the backend's stream
  // for every lane's last head).
  std::vector<int64_t> offset(H_ + 1, 0);
  int64_t t_max = 1;
  for (int64_t h = 0; h < H_; ++h) {
    offset[h + 1] = offset[h] + plan.heads[h].t * dv_;
    t_max = std::max(t_max, plan.heads[h].t);
  }
  // No reallocation (an implicit device synchronisation) while heads are queued.
  const size_t lanes = std::min<size_t>(lanes_.size(), static_cast<size_t>(std::max<int64_t>(H_, 1)));
  for (size_t i = 0; i < lanes; ++i) {
    if (auto s = lanes_[i]->Reserve(t_max, n_max, d_, dv_); !s.ok()) return s;
  }
  if (auto s = cv_all_.Reserve(std::max<int64_t>(offset[H_], 1)); !s.ok()) return s;
  if (auto s = info_all_.Reserve(2 * H_); !s.ok()) return s;
  if (auto s = err_all_.Reserve(6 * H_); !s.ok()) return s;
  if (auto s = sel_err_.Reserve(6 * H_); !s.ok()) return s;
  if (auto s = sel_cv_.Reserve(std::max<int64_t>(offset[H_], 1)); !s.ok()) return s;
  KVC_CUDA(cudaMemsetAsync(info_all_.get(), 0, 2 * H_ * sizeof(int), stream_));
  KVC_CUDA(cudaMemsetAsync(err_all_.get(), 0, 6 * H_ * sizeof(double), stream_));
  KVC_CUDA(cudaMemsetAsync(sel_err_.get(), 0, 6 * H_ * sizeof(double), stream_));
  // Stage times from device events (start, values fitted, evaluated) per head: host clocks would
  // only measure the queueing.
  while (events_.size() < static_cast<size_t>(3 * H_ + 1)) {
    cudaEvent_t e;
    KVC_CUDA(cudaEventCreate(&e));
    events_.push_back(e);
  }
  cudaEvent_t fitted_mass = events_[3 * H_];
  KVC_CUDA(cudaEventRecord(fitted_mass, stream_));
  for (size_t i = 1; i < lanes; ++i) KVC_CUDA(cudaStreamWaitEvent(lanes_[i]->stream, fitted_mass, 0));
  for (int64_t h = 0; h < H_; ++h) {
    const CompactedHead& head = (*result)[h];
    const bool fit = plan.heads[h].fit;
    HeadLane& lane = *lanes_[h % lanes];
    const int64_t t = plan.heads[h].t;
    float* cv = cv_all_.get() + offset[h];
    if (auto s = Upload(lane.idx, head.indices.data(), t, lane.stream); !s.ok()) return s;
    GatherRows(in_->keys.get() + h * T_ * d_, lane.idx.get(), t, d_, lane.ck.get(), lane.stream);
    KVC_LAUNCHED("GatherRows");
    KVC_CUDA(cudaEventRecord(events_[3 * h], lane.stream));
    if (fit) {
      if (auto s = ValueFit(lane, h, nf, t, ValueRidge(plan.heads[h].options, t, in_->distinct_fit.at(h)), head.beta, cv,
                            info_all_.get() + 2 * h);
          !s.ok()) {
        return absl::Status(s.code(), absl::StrCat("head ", h, ": ", s.message()));
      }
    } else {
      if (auto s = Upload(lane.beta, head.beta.data(), t, lane.stream); !s.ok()) return s;
      KVC_CUDA(cudaMemcpyAsync(cv, head.values.data(), t * dv_ * sizeof(float), cudaMemcpyHostToDevice, lane.stream));
    }
    KVC_CUDA(cudaEventRecord(events_[3 * h + 1], lane.stream));
    if (auto s = EvaluateHead(lane, h, t, nf, ne, cv, err_all_.get() + 6 * h); !s.ok()) return s;
    if (fit && ne > 0) {
      // Plain selection of the same keys on the same queries (beta = b_S, C_v = V_S).
      float* sel_cv = sel_cv_.get() + offset[h];
      GatherRows(in_->values.get() + h * T_ * dv_, lane.idx.get(), t, dv_, sel_cv, lane.stream);
      KVC_LAUNCHED("GatherRows(V_S)");
      if (auto s = Upload(lane.beta, selection[h].beta.data(), t, lane.stream); !s.ok()) return s;
      if (auto s = EvaluateHead(lane, h, t, nf, ne, sel_cv, sel_err_.get() + 6 * h); !s.ok()) return s;
    }
    KVC_CUDA(cudaEventRecord(events_[3 * h + 2], lane.stream));
  }
  for (size_t i = 1; i < lanes; ++i) {
    KVC_CUDA(cudaEventRecord(lanes_[i]->done, lanes_[i]->stream));
    KVC_CUDA(cudaStreamWaitEvent(stream_, lanes_[i]->done, 0));
  }
  std::vector<float> cv_host(offset[H_]);
  std::vector<int> info(2 * H_);
  std::vector<double> err(6 * H_), sel_err(6 * H_);
  if (auto s = ToHost(cv_host.data(), cv_all_.get(), cv_host.size(), stream_); !s.ok()) return s;
  if (auto s = ToHost(info.data(), info_all_.get(), info.size(), stream_); !s.ok()) return s;
  if (auto s = ToHost(err.data(), err_all_.get(), err.size(), stream_); !s.ok()) return s;
  if (auto s = ToHost(sel_err.data(), sel_err_.get(), sel_err.size(), stream_); !s.ok()) return s;
  for (int64_t h = 0; h < H_; ++h) {
    float fit_ms = 0, eval_ms = 0;
    KVC_CUDA(cudaEventElapsedTime(&fit_ms, events_[3 * h], events_[3 * h + 1]));
    KVC_CUDA(cudaEventElapsedTime(&eval_ms, events_[3 * h + 1], events_[3 * h + 2]));
    seconds->value_fit += fit_ms / 1e3;
    seconds->evaluate += eval_ms / 1e3;
  }
  const int64_t n_eval = ne > 0 ? ne : nf;
  const auto figures_of = [n_eval](const double* e) {
    HeadQuality q;
    q.fit_output_rel_error = static_cast<float>(std::sqrt(e[0]) / std::max(std::sqrt(e[1]), 1e-300));
    q.output_rel_error = static_cast<float>(std::sqrt(e[3]) / std::max(std::sqrt(e[4]), 1e-300));
    q.mass_rel_error = static_cast<float>(e[5] / std::max<int64_t>(n_eval, 1));
    q.eval_queries = n_eval;
    return q;
  };
  for (int64_t h = 0; h < H_; ++h) {
    if (plan.heads[h].fit) {
      if (info[2 * h] != 0) {
        return absl::InternalError(absl::StrCat("head ", h, ": value fit: Cholesky of X^T X + lambda I failed (cuSOLVER info ",
                                                info[2 * h], "); raise options.ridge"));
      }
      if (info[2 * h + 1] != 0) return absl::InternalError(absl::StrCat("head ", h, ": value fit: potrs info ", info[2 * h + 1]));
      (*result)[h].values = ConstMatrixMapF(cv_host.data() + offset[h], plan.heads[h].t, dv_);
      if (ne > 0) (*figures)[h].selection = figures_of(sel_err.data() + 6 * h);
    }
    (*figures)[h].fitted = figures_of(err.data() + 6 * h);
  }
  return absl::OkStatus();
}

LayerSteps& CudaBackend::BindSteps(const LayerJob& job) {
  const LayerData& data = job.data;
  H_ = data.heads, T_ = data.tokens, d_ = data.head_dim, dv_ = data.value_dim, scale_ = data.scale;
  inputs_dtype_ = data.inputs_dtype;
  has_bias_ = !data.bias.empty();
  job_ = &job;
  in_ = nullptr;
  if (!host_pool_) host_pool_ = std::make_unique<ThreadPool>(std::max(1u, std::thread::hardware_concurrency()));
  return *this;
}

absl::StatusOr<LayerResult> CudaBackend::Run(const LayerJob& job) {
  absl::StatusOr<LayerPlan> plan = PlanLayer(job);
  if (!plan.ok()) return plan.status();
  absl::StatusOr<LayerResult> result = RunLayerPipeline(*plan, BindSteps(job), host_pool_.get(), job.cancelled);
  job_ = nullptr;
  return result;
}

}  // namespace

LayerSteps& CudaStepsFor(Backend& backend, const LayerJob& job) { return static_cast<CudaBackend&>(backend).BindSteps(job); }

DeviceBytes EstimateDeviceBytes(const LayerJob& job, size_t workspace_bytes, int head_lanes) {
  return EstimateDeviceBytesImpl(job, workspace_bytes, head_lanes);
}

std::string CudaUnavailableReason() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (count == 0) return "no CUDA device";
  return "";
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options) {
  if (std::string why = CudaUnavailableReason(); !why.empty()) return absl::UnavailableError(why);
  auto backend = std::make_unique<CudaBackend>(options);
  if (absl::Status s = backend->Init(); !s.ok()) return s;
  return std::unique_ptr<Backend>(std::move(backend));
}

absl::StatusOr<std::vector<std::unique_ptr<Backend>>> MakeCudaBackends(CudaBackendOptions options, int lanes) {
  if (lanes < 1) return absl::InvalidArgumentError("at least one CUDA backend is needed");
  options.memory_share = 1.0 / lanes;
  std::vector<std::unique_ptr<Backend>> out;
  for (int i = 0; i < lanes; ++i) {
    absl::StatusOr<std::unique_ptr<Backend>> backend = MakeCudaBackend(options);
    if (!backend.ok()) return backend.status();
    out.push_back(*std::move(backend));
  }
  return out;
}

}  // namespace kvcompact::kernels
