#include "kernels/device_lsq.h"

#include <algorithm>

namespace kvcompact::kernels {
namespace {

size_t DoublesFor(int64_t t) { return static_cast<size_t>(2 * t * t + kLsqVectors * t); }

}  // namespace

DeviceBoundedLsq::~DeviceBoundedLsq() {
  for (auto& lane : lane_) {
    if (lane->solver) cusolverDnDestroy(lane->solver);
    if (lane->done) cudaEventDestroy(lane->done);
    if (lane->stream) cudaStreamDestroy(lane->stream);
  }
  if (ready_) cudaEventDestroy(ready_);
}

absl::Status DeviceBoundedLsq::Init() {
  KVC_CUDA(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  for (int i = 0; i < std::max(1, lanes_); ++i) {
    auto lane = std::make_unique<Lane>();
    KVC_CUDA(cudaStreamCreateWithFlags(&lane->stream, cudaStreamNonBlocking));
    KVC_CUDA(cudaEventCreateWithFlags(&lane->done, cudaEventDisableTiming));
    KVC_CUSOLVER(cusolverDnCreate(&lane->solver));
    KVC_CUSOLVER(cusolverDnSetStream(lane->solver, lane->stream));
    lane_.push_back(std::move(lane));
  }
  return absl::OkStatus();
}

size_t DeviceBoundedLsq::BytesFor(const std::vector<int64_t>& sizes) {
  size_t doubles = 0;
  int64_t t_max = 1;
  for (int64_t t : sizes) doubles += DoublesFor(t), t_max = std::max(t_max, t);
  // + the Cholesky workspace, bounded by one t_max x t_max matrix in practice.
  return (doubles + static_cast<size_t>(t_max * t_max)) * sizeof(double) +
         sizes.size() * (sizeof(LsqProblem) + sizeof(LsqState) + 2 * sizeof(int));
}

absl::Status DeviceBoundedLsq::Reset(const std::vector<LsqBounds>& problems) {
  size_t doubles = 0;
  t_max_ = 1;
  for (const LsqBounds& b : problems) doubles += DoublesFor(b.t), t_max_ = std::max(t_max_, b.t);
  if (auto s = arena_.Reserve(std::max<size_t>(doubles, 1)); !s.ok()) return s;
  const size_t count = std::max<size_t>(problems.size(), 1);
  if (auto s = problems_.Reserve(count); !s.ok()) return s;
  if (auto s = states_.Reserve(count); !s.ok()) return s;
  if (auto s = info_.Reserve(count); !s.ok()) return s;
  if (auto s = solve_info_.Reserve(count); !s.ok()) return s;
  host_problems_.assign(problems.size(), LsqProblem{});
  double* next = arena_.get();
  for (size_t i = 0; i < problems.size(); ++i) {
    LsqProblem& p = host_problems_[i];
    p.t = problems[i].t;
    p.lo = problems[i].lo;
    p.hi = problems[i].hi;
    p.max_iterations = problems[i].max_iterations;
    p.gram = next;
    p.system = next + p.t * p.t;
    p.vec = next + 2 * p.t * p.t;
    next += DoublesFor(p.t);
  }
  if (!problems.empty()) {
    KVC_CUDA(cudaMemcpyAsync(problems_.get(), host_problems_.data(), problems.size() * sizeof(LsqProblem),
                             cudaMemcpyHostToDevice, stream_));
  }
  return absl::OkStatus();
}

absl::Status DeviceBoundedLsq::ReadStates() {
  KVC_CUDA(cudaMemcpyAsync(host_states_.data(), states_.get(), host_states_.size() * sizeof(LsqState),
                           cudaMemcpyDeviceToHost, stream_));
  KVC_CUDA(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status DeviceBoundedLsq::FactorAndSolve(const std::vector<int>& all, const std::vector<int>& orders) {
  std::vector<int> which;  // a system with no free variable has nothing to factor
  for (int i : all) {
    if (orders[i] > 0) which.push_back(i);
  }
  if (which.empty()) return absl::OkStatus();
  KVC_CUDA(cudaEventRecord(ready_, stream_));
  const size_t used = std::min(lane_.size(), which.size());
  for (size_t k = 0; k < used; ++k) {
    Lane& lane = *lane_[k];
    KVC_CUDA(cudaStreamWaitEvent(lane.stream, ready_, 0));
    for (size_t q = k; q < which.size(); q += used) {
      const int i = which[q];
      const LsqProblem& p = host_problems_[i];
      const int t = orders[i];
      int lwork = 0;
      KVC_CUSOLVER(cusolverDnDpotrf_bufferSize(lane.solver, CUBLAS_FILL_MODE_LOWER, t, p.system, t, &lwork));
      if (static_cast<size_t>(lwork) > lane.work.capacity()) {
        // Growing frees the old buffer: let this lane's queued work finish first.
        KVC_CUDA(cudaStreamSynchronize(lane.stream));
        if (auto s = lane.work.Reserve(std::max(lwork, 1)); !s.ok()) return s;
      }
      // info_[i] > 0: not positive definite; the direction kernel then falls back to the gradient.
      KVC_CUSOLVER(cusolverDnDpotrf(lane.solver, CUBLAS_FILL_MODE_LOWER, t, p.system, t, lane.work.get(), lwork,
                                    info_.get() + i));
      KVC_CUSOLVER(cusolverDnDpotrs(lane.solver, CUBLAS_FILL_MODE_LOWER, t, 1, p.system, t, p.vec + kLsqSol * p.t, t,
                                    solve_info_.get() + i));
    }
    KVC_CUDA(cudaEventRecord(lane.done, lane.stream));
    KVC_CUDA(cudaStreamWaitEvent(stream_, lane.done, 0));
  }
  return absl::OkStatus();
}

absl::Status DeviceBoundedLsq::Solve(const BoundedLsqOptions& options, std::vector<LsqOutcome>* outcomes) {
  const int count = static_cast<int>(host_problems_.size());
  outcomes->assign(count, LsqOutcome{});
  if (count == 0) return absl::OkStatus();
  host_states_.assign(count, LsqState{});
  std::vector<int> all(count);
  for (int i = 0; i < count; ++i) all[i] = i;

  // Start from the clamped unconstrained solution (Cholesky of G + 1e-12 (tr G / t) I).
  LsqPrepare(problems_.get(), states_.get(), count, t_max_, stream_);
  KVC_LAUNCHED("LsqPrepare");
  std::vector<int> orders(count);
  for (int i = 0; i < count; ++i) orders[i] = static_cast<int>(host_problems_[i].t);
  if (auto s = FactorAndSolve(all, orders); !s.ok()) return s;
  LsqStart(problems_.get(), info_.get(), count, stream_);
  KVC_LAUNCHED("LsqStart");

  const double one = 1, minus_one = -1, zero = 0;
  std::vector<int> active = all;
  for (int it = 0; it < options.max_iterations && !active.empty(); ++it) {
    for (int i : active) {  // grad = G w - c
      const LsqProblem& p = host_problems_[i];
      const int t = static_cast<int>(p.t);
      KVC_CUDA(cudaMemcpyAsync(p.vec + kLsqGrad * p.t, p.vec + kLsqRhs * p.t, p.t * sizeof(double), cudaMemcpyDeviceToDevice,
                               stream_));
      KVC_CUBLAS(cublasDgemv(blas_, CUBLAS_OP_N, t, t, &one, p.gram, t, p.vec + kLsqW * p.t, 1, &minus_one,
                             p.vec + kLsqGrad * p.t, 1));
    }
    LsqAnalyze(problems_.get(), states_.get(), count, options.tolerance, stream_);
    KVC_LAUNCHED("LsqAnalyze");
    if (auto s = ReadStates(); !s.ok()) return s;
    std::vector<int> still;
    for (int i : active) {
      if (host_states_[i].status == kLsqConverged) {
        (*outcomes)[i] = {it, true};
      } else {
        still.push_back(i);
      }
    }
    active.swap(still);
    if (active.empty()) break;

    LsqBuildSystem(problems_.get(), states_.get(), count, t_max_, stream_);
    KVC_LAUNCHED("LsqBuildSystem");
    for (int i : active) orders[i] = host_states_[i].nfree;  // as Analyze left them (read above)
    if (auto s = FactorAndSolve(active, orders); !s.ok()) return s;
    LsqDirection(problems_.get(), states_.get(), info_.get(), count, stream_);
    KVC_LAUNCHED("LsqDirection");

    // Armijo search along the projection arc; all problems try alpha = 1 before the first sync.
    std::vector<int> searching = active;
    for (int round = 0; round < 40 && !searching.empty(); ++round) {
      LsqTrial(problems_.get(), states_.get(), count, stream_);
      KVC_LAUNCHED("LsqTrial");
      for (int i : searching) {
        const LsqProblem& p = host_problems_[i];
        const int t = static_cast<int>(p.t);
        KVC_CUBLAS(cublasDgemv(blas_, CUBLAS_OP_N, t, t, &one, p.gram, t, p.vec + kLsqTrial * p.t, 1, &zero,
                               p.vec + kLsqGt * p.t, 1));
      }
      LsqAccept(problems_.get(), states_.get(), count, stream_);
      KVC_LAUNCHED("LsqAccept");
      if (auto s = ReadStates(); !s.ok()) return s;
      std::vector<int> next;
      for (int i : searching) {
        if (host_states_[i].searching) next.push_back(i);
      }
      searching.swap(next);
    }
    // Where the Newton arc failed (numerically flat): one projected-gradient step.
    LsqGradientStep(problems_.get(), states_.get(), count, stream_);
    KVC_LAUNCHED("LsqGradientStep");
    for (int i : active) (*outcomes)[i] = {it + 1, false};
  }
  KVC_CUDA(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status DeviceBoundedLsq::SolveAccelerated(const AcceleratedLsqOptions& options,
                                               std::vector<LsqOutcome>* outcomes, int check_every) {
  const int count = static_cast<int>(host_problems_.size());
  outcomes->assign(count, LsqOutcome{});
  if (count == 0) return absl::OkStatus();
  host_states_.assign(count, LsqState{});
  int longest = 0;
  bool defaulted = false;  // a problem without its own bound takes the options' (Reset uploaded 0)
  for (LsqProblem& p : host_problems_) {
    if (p.max_iterations <= 0) p.max_iterations = options.max_iterations, defaulted = true;
    longest = std::max(longest, p.max_iterations);
  }
  if (defaulted) {
    KVC_CUDA(cudaMemcpyAsync(problems_.get(), host_problems_.data(), count * sizeof(LsqProblem),
                             cudaMemcpyHostToDevice, stream_));
  }
  AccPrepare(problems_.get(), states_.get(), count, stream_);
  KVC_LAUNCHED("AccPrepare");
  AccScale(problems_.get(), count, t_max_, stream_);
  KVC_LAUNCHED("AccScale");
  const int power = std::max(1, options.power_iterations);
  for (int k = 0; k < power; ++k) {
    AccProduct(problems_.get(), states_.get(), count, t_max_, kLsqDir, kLsqGt, stream_);
    KVC_LAUNCHED("AccProduct");
    AccPowerStep(problems_.get(), states_.get(), count, k == 0, k + 1 == power, stream_);
    KVC_LAUNCHED("AccPowerStep");
  }
  for (int it = 0; it < longest; ++it) {
    AccProduct(problems_.get(), states_.get(), count, t_max_, kLsqTrial, kLsqGt, stream_);
    KVC_LAUNCHED("AccProduct");
    AccStep(problems_.get(), states_.get(), count, options.tolerance, stream_);
    KVC_LAUNCHED("AccStep");
    if (check_every > 0 && (it + 1) % check_every == 0 && it + 1 < longest) {
      if (auto s = ReadStates(); !s.ok()) return s;
      bool done = true;
      for (const LsqState& st : host_states_) done = done && st.status != kLsqActive;
      if (done) break;
    }
  }
  AccFinish(problems_.get(), count, stream_);
  KVC_LAUNCHED("AccFinish");
  if (auto s = ReadStates(); !s.ok()) return s;
  for (int i = 0; i < count; ++i) {
    (*outcomes)[i] = {host_states_[i].iterations, host_states_[i].status == kLsqConverged};
  }
  return absl::OkStatus();
}

}  // namespace kvcompact::kernels
