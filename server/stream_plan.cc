#include "server/stream_plan.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "proto/wire.h"

namespace kvcompact::server {

int64_t StreamPlan::Budget(uint32_t layer, uint32_t head, int64_t tokens) const {
  switch (budget.kind_case()) {
    case v1::Budget::kRatio:
      return std::max<int64_t>(1, std::llround(static_cast<double>(tokens) / budget.ratio()));
    case v1::Budget::kTokens: return budget.tokens();
    case v1::Budget::kPerHead: return budget.per_head().tokens(layer * num_kv_heads + head);
    default: return 0;
  }
}

absl::StatusOr<StreamPlan> MakeStreamPlan(const v1::StreamHeader& header) {
  const v1::Geometry& g = header.geometry();
  const v1::Options& o = header.options();
  StreamPlan plan;
  plan.request_id = header.request_id();
  if (g.num_layers() == 0) return absl::InvalidArgumentError("geometry.num_layers must be > 0");
  if (g.num_kv_heads() == 0) return absl::InvalidArgumentError("geometry.num_kv_heads must be > 0");
  if (g.head_dim() == 0 || g.head_dim() > 1024) {
    return absl::InvalidArgumentError("geometry.head_dim must be in [1, 1024]");
  }
  if (g.value_dim() > 1024) return absl::InvalidArgumentError("geometry.value_dim must be <= 1024");
  if (!std::isfinite(g.logit_scale()) || g.logit_scale() < 0) {
    return absl::InvalidArgumentError("geometry.logit_scale must be finite and >= 0 (0 = 1/sqrt(d))");
  }
  plan.num_layers = g.num_layers();
  plan.num_kv_heads = g.num_kv_heads();
  plan.head_dim = g.head_dim();
  plan.value_dim = g.value_dim() ? g.value_dim() : g.head_dim();
  plan.scale = g.logit_scale() > 0 ? g.logit_scale() : 1.0f / std::sqrt(static_cast<float>(g.head_dim()));

  const v1::Method method = o.method() == v1::METHOD_UNSPECIFIED ? v1::METHOD_AM_HIGHEST_ATTENTION : o.method();
  if (!v1::Method_IsValid(method)) return absl::InvalidArgumentError("options.method is unknown");
  plan.options.method = static_cast<Method>(method);
  if (o.score() != v1::SCORE_REDUCE_UNSPECIFIED) {
    if (!v1::ScoreReduce_IsValid(o.score())) return absl::InvalidArgumentError("options.score is unknown");
    plan.options.score = static_cast<ScoreReduce>(o.score());
  }
  if (o.pool_kernel() > 0) {
    if (o.pool_kernel() % 2 == 0 || o.pool_kernel() > 255) {
      return absl::InvalidArgumentError("options.pool_kernel must be odd and <= 255");
    }
    plan.options.pool_kernel = static_cast<int>(o.pool_kernel());
  }
  if (o.sink_tokens() > 0) plan.options.sink_tokens = static_cast<int>(o.sink_tokens());
  plan.options.seed = o.seed();
  if (!(o.holdout_fraction() >= 0 && o.holdout_fraction() <= 0.9f)) {
    return absl::InvalidArgumentError("options.holdout_fraction must be in [0, 0.9]");
  }
  plan.options.holdout_fraction = o.holdout_fraction();
  if (o.ridge() < 0 || !std::isfinite(o.ridge())) return absl::InvalidArgumentError("options.ridge must be >= 0");
  if (o.ridge() > 0) plan.options.ridge = o.ridge();
  if (o.beta_min() != 0 || o.beta_max() != 0) {
    if (!(o.beta_min() < o.beta_max()) || o.beta_max() > 30 || o.beta_min() < -30) {
      return absl::InvalidArgumentError("options.beta_min < beta_max required, both within [-30, 30]");
    }
    plan.options.beta_min = o.beta_min();
    plan.options.beta_max = o.beta_max();
  }
  const v1::OmpOptions& omp = o.omp();
  if (omp.keys_per_step() > 4096 || omp.refit_interval() > 4096) {
    return absl::InvalidArgumentError("options.omp.keys_per_step and refit_interval must be <= 4096");
  }
  if (!(omp.progressive() >= 0 && omp.progressive() <= 1)) {
    return absl::InvalidArgumentError("options.omp.progressive must be in [0, 1]");
  }
  plan.options.omp_keys_per_step = static_cast<int>(omp.keys_per_step());
  plan.options.omp_refit_interval = static_cast<int>(omp.refit_interval());
  plan.options.omp_progressive = omp.progressive();
  plan.options.omp_pool = static_cast<int64_t>(std::min<uint64_t>(omp.candidates(), uint64_t{1} << 40));
  plan.return_indices = o.return_indices();
  if (o.output_dtype() != v1::DTYPE_UNSPECIFIED) {
    auto dt = DTypeFromProto(o.output_dtype());
    if (!dt.ok()) return absl::InvalidArgumentError("options.output_dtype is unknown");
    plan.output_dtype = *dt;
  }

  plan.budget = o.budget();
  switch (o.budget().kind_case()) {
    case v1::Budget::kRatio:
      if (!(o.budget().ratio() > 0) || !std::isfinite(o.budget().ratio())) {
        return absl::InvalidArgumentError("budget.ratio must be > 0");
      }
      break;
    case v1::Budget::kTokens:
      if (o.budget().tokens() == 0) return absl::InvalidArgumentError("budget.tokens must be > 0");
      break;
    case v1::Budget::kPerHead: {
      const auto& list = o.budget().per_head().tokens();
      const uint64_t want = static_cast<uint64_t>(plan.num_layers) * plan.num_kv_heads;
      if (static_cast<uint64_t>(list.size()) != want) {
        return absl::InvalidArgumentError(absl::StrCat("budget.per_head needs num_layers * num_kv_heads = ",
                                                       want, " entries, got ", list.size()));
      }
      for (int i = 0; i < list.size(); ++i) {
        if (list[i] == 0) return absl::InvalidArgumentError(absl::StrCat("budget.per_head[", i, "] must be > 0"));
      }
      break;
    }
    default: return absl::InvalidArgumentError("options.budget is required (ratio, tokens or per_head)");
  }
  return plan;
}

}  // namespace kvcompact::server
