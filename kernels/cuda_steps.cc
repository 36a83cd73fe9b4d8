// The pipeline's steps (core/pipeline.h) on the CUDA backend: statistics and scores, OMP
// selection, the batched mass fit, and the value fits and evaluations of a layer's heads.
#include "kernels/cuda_backend_impl.h"

namespace kvcompact::kernels::internal {

absl::Status CudaBackend::Statistics(const CompactionPlan& plan, MatrixF* scores, StageSeconds* seconds) {
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

absl::Status CudaBackend::SelectOmp(const CompactionPlan& plan, const std::vector<int64_t>& heads, const MatrixF& scores,
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

absl::Status CudaBackend::FitMass(const CompactionPlan& plan, std::vector<CompactedHead>* result, StageSeconds* seconds) {
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

absl::Status CudaBackend::FitValuesAndEvaluate(const CompactionPlan& plan, const std::vector<CompactedHead>& selection,
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

}  // namespace kvcompact::kernels::internal
