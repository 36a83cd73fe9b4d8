#include "server/stream_plan.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/budget.h"
#include "proto/wire.h"
#include "server/limits.h"

namespace kvcompact::server {

absl::StatusOr<std::vector<int64_t>> StreamPlan::LayerBudgets(uint32_t layer, int64_t tokens) const {
  const int64_t H = num_kv_heads;
  auto nominal = [&](double ratio) { return RatioBudget(tokens, ratio); };
  switch (budget.kind_case()) {
    case v1::Budget::kRatio: return std::vector<int64_t>(H, nominal(budget.ratio()));
    case v1::Budget::kTokens: return std::vector<int64_t>(H, budget.tokens());
    case v1::Budget::kPerHead: {
      const auto& list = budget.per_head().tokens();
      return std::vector<int64_t>(list.begin() + layer * H, list.begin() + (layer + 1) * H);
    }
    case v1::Budget::kAllocation: {
      const int64_t t = KeptKeys(nominal(budget.allocation().ratio()), tokens);
      if (!cross_layer()) return std::vector<int64_t>(H, t);  // per-layer rules split this later
      const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(std::floor(head_cap * tokens)));
      const int64_t heads = static_cast<int64_t>(request_shares.size());
      if (t > cap) return absl::InvalidArgumentError("budget.allocation.ratio leaves more than head_cap x T per head");
      absl::StatusOr<std::vector<int64_t>> all = WaterFill(request_shares, std::vector<int64_t>(heads, cap), t * heads);
      if (!all.ok()) return all.status();
      return std::vector<int64_t>(all->begin() + layer * H, all->begin() + (layer + 1) * H);
    }
    default: return absl::InvalidArgumentError("options.budget is required");
  }
}

namespace {

absl::Status PlanAllocation(const v1::Allocation& a, const ProfileRegistry* profiles, StreamPlan* plan) {
  if (!(a.ratio() > 0) || !std::isfinite(a.ratio())) return absl::InvalidArgumentError("budget.allocation.ratio must be > 0");
  if (!(a.head_cap() >= 0 && a.head_cap() <= 1)) return absl::InvalidArgumentError("budget.allocation.head_cap must be in (0, 1]");
  if (a.head_cap() > 0) plan->head_cap = a.head_cap();
  plan->layer_rule.head_cap = plan->head_cap;
  if (a.probe_queries() > 0) plan->layer_rule.probe_queries = a.probe_queries();
  const int64_t L = plan->num_layers, H = plan->num_kv_heads;
  switch (a.rule()) {
    case v1::Allocation::RULE_UNSPECIFIED:
    case v1::Allocation::RULE_UNIFORM: return absl::OkStatus();
    case v1::Allocation::RULE_PYRAMID: {
      const double spread = a.pyramid_spread() > 0 ? a.pyramid_spread() : 4.0;
      if (!(spread >= 1) || !std::isfinite(spread)) return absl::InvalidArgumentError("budget.allocation.pyramid_spread must be >= 1");
      plan->request_shares = PyramidShares(L, H, spread);
      return absl::OkStatus();
    }
    case v1::Allocation::RULE_PROFILE: {
      std::vector<double> shares(a.shares().begin(), a.shares().end());
      if (!a.profile().empty()) {
        if (!shares.empty()) return absl::InvalidArgumentError("budget.allocation: give a profile name or shares, not both");
        const v1::BudgetProfile* p = profiles ? profiles->Find(a.profile()) : nullptr;
        if (p == nullptr) return absl::NotFoundError(absl::StrCat("no budget profile named '", a.profile(), "' (see ServerInfo.profiles)"));
        if (p->num_layers() != L || p->num_kv_heads() != H) {
          return absl::InvalidArgumentError(absl::StrCat("profile ", a.profile(), " is for ", p->num_layers(), " layers x ",
                                                         p->num_kv_heads(), " KV heads; the stream has ", L, " x ", H));
        }
        shares.assign(p->shares().begin(), p->shares().end());
      }
      if (static_cast<int64_t>(shares.size()) != L * H) {
        return absl::InvalidArgumentError(absl::StrCat("budget.allocation.shares needs num_layers x num_kv_heads = ", L * H,
                                                       " entries, got ", shares.size()));
      }
      double sum = 0;
      for (double s : shares) {
        if (!(s >= 0) || !std::isfinite(s)) return absl::InvalidArgumentError("budget.allocation.shares must be finite and >= 0");
        sum += s;
      }
      if (!(sum > 0)) return absl::InvalidArgumentError("budget.allocation.shares sum to 0");
      plan->request_shares = std::move(shares);
      return absl::OkStatus();
    }
    case v1::Allocation::RULE_GLOBAL_TOPK:
      plan->layer_rule.kind = LayerAllocation::Kind::kGlobalTopK;
      return absl::OkStatus();
    case v1::Allocation::RULE_SENSITIVITY:
      plan->layer_rule.kind = LayerAllocation::Kind::kSensitivity;
      return absl::OkStatus();
    default: return absl::InvalidArgumentError("budget.allocation.rule is unknown");
  }
}

}  // namespace

absl::StatusOr<StreamPlan> MakeStreamPlan(const v1::StreamHeader& header, const ProfileRegistry* profiles) {
  const v1::Geometry& g = header.geometry();
  const v1::Options& o = header.options();
  StreamPlan plan;
  // Echoed into logs: bounded and printable, so that it cannot forge or flood log lines.
  if (header.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("request_id is longer than ", kMaxRequestIdBytes, " bytes"));
  }
  for (unsigned char c : header.request_id()) {
    if (c < 0x20 || c > 0x7e) return absl::InvalidArgumentError("request_id must be printable ASCII (0x20-0x7e)");
  }
  plan.request_id = header.request_id();
  // Bounded so that per-request tables (budgets, shares: layers x heads) stay small whatever a
  // client declares; real models have tens to a few hundred layers and at most a few hundred heads.
  constexpr uint32_t kMaxLayers = 4096, kMaxKvHeads = 1024;
  if (g.num_layers() == 0 || g.num_layers() > kMaxLayers) {
    return absl::InvalidArgumentError(absl::StrCat("geometry.num_layers must be in [1, ", kMaxLayers, "]"));
  }
  if (g.num_kv_heads() == 0 || g.num_kv_heads() > kMaxKvHeads) {
    return absl::InvalidArgumentError(absl::StrCat("geometry.num_kv_heads must be in [1, ", kMaxKvHeads, "]"));
  }
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
  if (o.sink_tokens() > kMaxRowsPerLayer) {
    return absl::InvalidArgumentError(absl::StrCat("options.sink_tokens must be <= ", kMaxRowsPerLayer));
  }
  if (o.sink_tokens() > 0) plan.options.sink_tokens = static_cast<int>(o.sink_tokens());
  plan.options.seed = o.seed();
  if (!(o.holdout_fraction() >= 0 && o.holdout_fraction() <= 0.9f)) {
    return absl::InvalidArgumentError("options.holdout_fraction must be in [0, 0.9]");
  }
  plan.options.holdout_fraction = o.holdout_fraction();
  if (o.ridge() < 0 || !std::isfinite(o.ridge())) return absl::InvalidArgumentError("options.ridge must be >= 0");
  if (o.ridge() > 0) plan.options.ridge = o.ridge();
  if (!std::isfinite(o.mass_prior()) || o.mass_prior() > 1e3) {
    return absl::InvalidArgumentError("options.mass_prior must be finite and <= 1000 (< 0: none)");
  }
  plan.options.mass_prior = o.mass_prior();
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
  if (o.chunk_tokens() > (uint64_t{1} << 40)) return absl::InvalidArgumentError("options.chunk_tokens is too large");
  plan.chunk_tokens = static_cast<int64_t>(o.chunk_tokens());
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
    case v1::Budget::kAllocation:
      if (auto s = PlanAllocation(o.budget().allocation(), profiles, &plan); !s.ok()) return s;
      break;
    default: return absl::InvalidArgumentError("options.budget is required (ratio, tokens, per_head or allocation)");
  }
  return plan;
}

}  // namespace kvcompact::server
