#include "core/cpu_steps.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "core/fit.h"
#include "core/omp.h"
#include "core/thread_pool.h"

namespace kvcompact {
namespace {

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

CpuLayerSteps::CpuLayerSteps(std::vector<HeadInput> heads, ThreadPool* pool, std::function<bool()> cancelled)
    : heads_(std::move(heads)), pool_(pool), cancelled_(std::move(cancelled)), state_(heads_.size()) {}

std::vector<int64_t> CpuLayerSteps::AllHeads() const {
  std::vector<int64_t> all(heads_.size());
  std::iota(all.begin(), all.end(), 0);
  return all;
}

void CpuLayerSteps::ForHeads(const std::vector<int64_t>& list, const std::function<void(int64_t, StageSeconds*)>& fn,
                             StageSeconds* total) {
  std::vector<StageSeconds> seconds(list.size());
  const auto body = [&](int64_t k) {
    if (!cancelled_ || !cancelled_()) fn(list[k], &seconds[k]);
  };
  const auto n = static_cast<int64_t>(list.size());
  if (pool_ != nullptr && n > 1) {
    pool_->ParallelFor(n, body);
  } else {
    for (int64_t k = 0; k < n; ++k) body(k);
  }
  for (const StageSeconds& s : seconds) *total += s;
}

absl::Status CpuLayerSteps::Statistics(const CompactionPlan& plan, MatrixF* scores, StageSeconds* seconds) {
  const auto H = static_cast<int64_t>(heads_.size());
  if (plan.reduce) scores->setZero(H, plan.tokens);
  ForHeads(AllHeads(), [&](int64_t h, StageSeconds* s) {
    const HeadPlan& p = plan.heads[h];
    HeadState& st = state_[h];
    auto start = std::chrono::steady_clock::now();
    SplitQueries(*heads_[h].queries, p.options.holdout_fraction, p.options.seed, &st.fit_q, &st.eval_q);
    const bool scored = plan.reduce && !p.unchanged;
    st.fit_stats = ComputeAttentionStats(heads_[h].block, st.fit_q, scored ? plan.reduce : std::nullopt,
                                         p.options.query_chunk);
    if (scored) scores->row(h) = st.fit_stats.scores.transpose();
    s->score += Since(start);
    if (st.eval_q.rows() > 0) {
      start = std::chrono::steady_clock::now();
      st.eval_stats = ComputeAttentionStats(heads_[h].block, st.eval_q, std::nullopt, p.options.query_chunk);
      s->evaluate += Since(start);
    }
  }, seconds);
  return absl::OkStatus();
}

absl::Status CpuLayerSteps::SelectOmp(const CompactionPlan& plan, const std::vector<int64_t>& heads, const MatrixF& scores,
                                      std::vector<std::vector<int32_t>>* kept) {
  // OMP over a candidate pool: one pass over the fitting queries builds the pool's Gram system,
  // then the greedy loop runs in Gram space (core/omp.h).
  StageSeconds unused;
  ForHeads(heads, [&](int64_t h, StageSeconds*) {
    const HeadPlan& p = plan.heads[h];
    const BlockView& block = heads_[h].block;
    const HeadState& st = state_[h];
    const std::vector<int32_t> pool =
        OmpCandidates(VectorF(scores.row(h).transpose()), plan.tokens, p.t, p.options.omp_pool);
    const auto [gram, rhs] = BuildMassSystem(
        SubsetLogits(st.fit_q, GatherRows(block.keys, pool), GatherBias(block, pool), block.scale),
        st.fit_stats.row_max, st.fit_stats.mass, /*prior=*/0.0);
    (*kept)[h] = SelectedPositions(::kvcompact::SelectOmp(gram, rhs, OmpParamsFor(p.options, *plan.spec, p.t)), pool);
  }, &unused);
  return absl::OkStatus();
}

absl::Status CpuLayerSteps::FitMass(const CompactionPlan& plan, std::vector<CompactedHead>* heads, StageSeconds* seconds) {
  ForHeads(plan.FittedHeads(), [&](int64_t h, StageSeconds* s) {
    const HeadPlan& p = plan.heads[h];
    HeadState& st = state_[h];
    CompactedHead& head = (*heads)[h];
    const auto start = std::chrono::steady_clock::now();
    const MatrixF logits = SubsetLogits(st.fit_q, head.keys, head.beta, heads_[h].block.scale);
    const auto [w_lo, w_hi] = WeightBounds(p.options, *plan.spec);
    st.distinct = DistinctQueryCount(st.fit_q);
    MassFitResult mass = ::kvcompact::FitMass(logits, st.fit_stats.row_max, st.fit_stats.mass, head.beta, w_lo, w_hi,
                                              MassPrior(p.options, p.t, st.distinct), p.options.mass_fit_solver,
                                              st.distinct);
    head.beta = std::move(mass.beta);
    head.mass_fit_converged = mass.solver.converged;
    head.mass_fit_iterations = mass.solver.iterations;
    s->mass_fit += Since(start);
    s->mass_solve += mass.solve_seconds;
  }, seconds);
  return absl::OkStatus();
}

HeadQuality CpuLayerSteps::Measure(const CompactedHead& head, const HeadState& st, float scale) const {
  HeadQuality q;
  float unused_mass;
  const int64_t m = std::min<int64_t>(st.fit_q.rows(), kFitErrorQueries);
  const AttentionStats fit_head{st.fit_stats.row_max.head(m), st.fit_stats.mass.head(m),
                                st.fit_stats.outputs.topRows(m), {}};
  MeasureErrors(head, st.fit_q.topRows(m), fit_head, scale, &q.fit_output_rel_error, &unused_mass);
  const bool held_out = st.eval_q.rows() > 0;
  MeasureErrors(head, held_out ? st.eval_q : st.fit_q, held_out ? st.eval_stats : st.fit_stats, scale,
                &q.output_rel_error, &q.mass_rel_error);
  q.eval_queries = held_out ? st.eval_q.rows() : st.fit_q.rows();
  return q;
}

absl::Status CpuLayerSteps::FitValuesAndEvaluate(const CompactionPlan& plan, const std::vector<CompactedHead>& selection,
                                                 std::vector<CompactedHead>* heads, std::vector<HeadFigures>* figures,
                                                 StageSeconds* seconds) {
  ForHeads(AllHeads(), [&](int64_t h, StageSeconds* s) {
    const HeadPlan& p = plan.heads[h];
    const HeadState& st = state_[h];
    const float scale = heads_[h].block.scale;
    CompactedHead& head = (*heads)[h];
    auto start = std::chrono::steady_clock::now();
    // Plain selection of a fitted head (its values V_S are the value fit's prior).
    CompactedHead plain;
    if (p.fit) {
      plain = selection[h];
      plain.values = GatherRows(heads_[h].block.values, plain.indices);
      const MatrixF design = RowSoftmax(SubsetLogits(st.fit_q, head.keys, head.beta, scale));
      head.values = FitValues(design, st.fit_stats.outputs, ValueRidge(p.options, p.t, st.distinct), &plain.values);
      s->value_fit += Since(start);
      start = std::chrono::steady_clock::now();
    }
    HeadFigures& f = (*figures)[h];
    f.fitted = Measure(head, st, scale);
    if (p.fit && st.eval_q.rows() > 0) {
      // Plain selection's held-out error; its fit error only where it is the one returned.
      HeadQuality sq = f.fitted;
      MeasureErrors(plain, st.eval_q, st.eval_stats, scale, &sq.output_rel_error, &sq.mass_rel_error);
      if (sq.output_rel_error < f.fitted.output_rel_error) sq = Measure(plain, st, scale);
      f.selection = sq;
    }
    s->evaluate += Since(start);
  }, seconds);
  return absl::OkStatus();
}

}  // namespace kvcompact
