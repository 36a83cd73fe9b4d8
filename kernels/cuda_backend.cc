// CUDA backend: set-up, memory bounds and the device work of each stage; the class is in
// cuda_backend_impl.h and the pipeline's steps (core/pipeline.h) built from this work are in
// cuda_steps.cc. Per layer, all KV heads at once for the n x T work (logits, softmax statistics,
// key scores, outputs: the fused kernels, or strided-batched cuBLAS over heads with query chunks
// bounded by the workspace, so the n x T matrix never exists whole); per head for the t-sized
// fits (ragged budgets): subset logits, Phi^T Phi and Phi^T m on the GPU; the bounded NNLS for all
// heads at once on the GPU in fp64 (kernels/device_lsq.h: the accelerated solver of
// core/bounded_lsq.h, every head in lockstep); X^T X and X^T Y on the GPU and the ridge solve by
// cuSOLVER Cholesky in fp32 (optionally heads over several streams, kernels/head_lane.h). Key
// selection runs in the pipeline on the host from the GPU's scores, so both backends pick the same
// keys; OMP's greedy loop (core/omp.h) runs on a host thread per head and reads its Gram matrix
// on the device from the pool's features.
#include "kernels/cuda_backend_impl.h"

namespace kvcompact::kernels {
namespace internal {

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
  absl::StatusOr<CompactionPlan> plan = PlanLayer(job);
  if (!plan.ok()) return plan.status();
  absl::StatusOr<LayerResult> result = RunLayerPipeline(*plan, BindSteps(job), host_pool_.get(), job.cancelled);
  job_ = nullptr;
  return result;
}

}  // namespace internal

using internal::CudaBackend;
using internal::EstimateDeviceBytesImpl;

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
