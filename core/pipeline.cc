#include "core/pipeline.h"

#include <chrono>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "core/budget.h"
#include "core/layer.h"
#include "core/selection.h"
#include "core/thread_pool.h"

namespace kvcompact {
namespace {

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void ForEachHead(ThreadPool* pool, int64_t heads, const std::function<void(int64_t)>& fn) {
  if (pool != nullptr && heads > 1) {
    pool->ParallelFor(heads, fn);
  } else {
    for (int64_t h = 0; h < heads; ++h) fn(h);
  }
}

std::string HeadPrefix(int64_t head, int64_t heads) { return heads > 1 ? absl::StrCat("head ", head, ": ") : ""; }

absl::Status Cancelled() { return absl::CancelledError("the stream is gone or the server is stopping"); }

// Plain selection of a head's kept keys: C_k = K[S], beta = b_S, and C_v = V[S] where no fit
// replaces it (a fitted head gathers V[S] only if plain selection is returned).
void GatherSelection(const BlockView& block, bool fitted, CompactedHead* head) {
  head->keys = GatherRows(block.keys, head->indices);
  head->beta = GatherBias(block, head->indices);
  if (!fitted) head->values = GatherRows(block.values, head->indices);
}

}  // namespace

std::vector<int64_t> CompactionPlan::FittedHeads() const {
  std::vector<int64_t> out;
  for (size_t h = 0; h < heads.size(); ++h) {
    if (heads[h].fit) out.push_back(static_cast<int64_t>(h));
  }
  return out;
}

absl::StatusOr<CompactionPlan> PlanHeads(std::vector<HeadOptions> options, int64_t tokens, bool has_queries) {
  const int64_t H = static_cast<int64_t>(options.size());
  CompactionPlan plan;
  plan.tokens = tokens;
  plan.has_queries = has_queries;
  plan.heads.resize(H);
  if (H == 0) return plan;
  const MethodSpec& spec = GetMethodSpec(options[0].method);
  plan.spec = &spec;
  if (spec.needs_queries && !has_queries) {
    return absl::InvalidArgumentError(
        absl::StrCat("method ", std::string(spec.name), " needs reference queries and none were given"));
  }
  bool any_scored = false;
  for (int64_t h = 0; h < H; ++h) {
    HeadPlan& p = plan.heads[h];
    p.options = std::move(options[h]);
    if (p.options.budget <= 0) return absl::InvalidArgumentError(absl::StrCat(HeadPrefix(h, H), "budget must be > 0"));
    p.unchanged = KeepsBlockUnchanged(p.options, tokens);
    p.t = KeptKeys(p.options.budget, tokens);
    p.fit = spec.fit == Fit::kAttentionMatching && has_queries && !p.unchanged;
    any_scored = any_scored || !p.unchanged;
  }
  if (UsesKeyScores(spec) && has_queries && any_scored) plan.reduce = plan.heads[0].options.score.value_or(spec.default_score);
  return plan;
}

absl::StatusOr<CompactionPlan> PlanLayer(const LayerJob& job) {
  if (static_cast<int64_t>(job.budgets.size()) != job.data.heads) {
    return absl::InvalidArgumentError("one budget per head is required");
  }
  std::vector<HeadOptions> options(job.data.heads);
  for (int64_t h = 0; h < job.data.heads; ++h) options[h] = HeadOptionsFor(job, h);
  return PlanHeads(std::move(options), job.data.tokens, job.data.queries > 0);
}

absl::StatusOr<LayerResult> RunLayerPipeline(const CompactionPlan& plan, LayerSteps& steps, ThreadPool* pool,
                                             const std::function<bool()>& cancelled) {
  const int64_t H = static_cast<int64_t>(plan.heads.size()), T = plan.tokens;
  const auto is_cancelled = [&] { return cancelled && cancelled(); };
  LayerResult result;
  result.heads.resize(H);
  if (H == 0) return result;
  const MethodSpec& spec = *plan.spec;
  if (plan.reduce && !steps.ComputesScore(*plan.reduce)) {
    return absl::InvalidArgumentError(absl::StrCat("key score ", std::string(ScoreReduceName(*plan.reduce)),
                                                   " is not computed by this backend; the CPU backend computes it"));
  }
  if (is_cancelled()) return Cancelled();

  MatrixF scores;
  if (plan.has_queries) {
    if (auto s = steps.Statistics(plan, &scores, &result.seconds); !s.ok()) return s;
  }
  if (is_cancelled()) return Cancelled();

  // Selection: OMP by the backend, every other rule on the host from the scores.
  std::vector<CompactedHead>& heads = result.heads;
  auto start = std::chrono::steady_clock::now();
  if (spec.selection == Selection::kOmp) {
    std::vector<int64_t> omp_heads;
    for (int64_t h = 0; h < H; ++h) {
      if (!plan.heads[h].unchanged) omp_heads.push_back(h);
    }
    std::vector<std::vector<int32_t>> kept(H);
    if (auto s = steps.SelectOmp(plan, omp_heads, scores, &kept); !s.ok()) return s;
    for (int64_t h : omp_heads) heads[h].indices = std::move(kept[h]);
  }
  ForEachHead(pool, H, [&](int64_t h) {
    const HeadPlan& p = plan.heads[h];
    CompactedHead& head = heads[h];
    if (p.unchanged) {
      head.indices.resize(T);
      std::iota(head.indices.begin(), head.indices.end(), 0);
    } else if (spec.selection != Selection::kOmp) {
      const VectorF head_scores = plan.reduce ? VectorF(scores.row(h).transpose()) : VectorF();
      head.indices = SelectKeys(spec.selection, T, head_scores, SelectionParamsFor(p.options, spec, p.t));
    }
    GatherSelection(steps.Block(h), p.fit, &head);
  });
  for (int64_t h = 0; h < H; ++h) {
    if (static_cast<int64_t>(heads[h].indices.size()) != plan.heads[h].t) {
      return absl::InternalError(absl::StrCat(HeadPrefix(h, H), "selection kept ", heads[h].indices.size(),
                                              " keys, not ", plan.heads[h].t));
    }
  }
  result.seconds.score += Since(start);
  if (!plan.has_queries) return result;  // nothing to fit or measure
  if (is_cancelled()) return Cancelled();

  std::vector<CompactedHead> selection(H);
  for (int64_t h : plan.FittedHeads()) selection[h] = heads[h];
  if (auto s = steps.FitMass(plan, &heads, &result.seconds); !s.ok()) return s;
  if (is_cancelled()) return Cancelled();
  std::vector<HeadFigures> figures(H);
  if (auto s = steps.FitValuesAndEvaluate(plan, selection, &heads, &figures, &result.seconds); !s.ok()) return s;
  if (is_cancelled()) return Cancelled();  // a step may have skipped heads once it was cancelled

  for (int64_t h = 0; h < H; ++h) {
    CompactedHead& head = heads[h];
    head.quality = figures[h].fitted;
    // Never worse than the simple thing: plain selection of the same keys where it did better on
    // the held-out queries.
    if (figures[h].selection && figures[h].selection->output_rel_error < head.quality.output_rel_error) {
      head.beta = std::move(selection[h].beta);
      head.values = GatherRows(steps.Block(h).values, head.indices);
      head.selection_kept = true;
      head.quality = *figures[h].selection;
    }
    head.quality.has_quality = true;
  }
  return result;
}

}  // namespace kvcompact
