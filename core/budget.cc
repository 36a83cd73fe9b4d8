#include "core/budget.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/attention.h"

namespace kvcompact {

int64_t RatioBudget(int64_t tokens, double ratio) {
  const double t = static_cast<double>(tokens) / ratio;
  if (!(t < static_cast<double>(tokens))) return tokens;  // also inf and NaN: never through llround
  return std::clamp<int64_t>(std::llround(t), 1, tokens);
}

namespace {

absl::Status CheckTotal(size_t heads, const std::vector<int64_t>& caps, int64_t total) {
  if (caps.size() != heads) return absl::InvalidArgumentError("one cap per head is required");
  const int64_t room = std::accumulate(caps.begin(), caps.end(), int64_t{0});
  if (total < static_cast<int64_t>(heads) || total > room) {
    return absl::InvalidArgumentError(absl::StrCat("a total budget of ", total, " cannot be split over ", heads,
                                                   " heads with at least 1 and at most ", room, " entries in all"));
  }
  for (int64_t c : caps) {
    if (c < 1) return absl::InvalidArgumentError("every head's cap must be >= 1");
  }
  return absl::OkStatus();
}

// Largest-remainder rounding of x (within [1, cap], summing to total up to rounding) to integers
// summing to total exactly.
std::vector<int64_t> RoundToTotal(const std::vector<double>& x, const std::vector<int64_t>& caps, int64_t total) {
  const size_t n = x.size();
  std::vector<int64_t> t(n);
  for (size_t h = 0; h < n; ++h) t[h] = std::clamp<int64_t>(static_cast<int64_t>(std::floor(x[h])), 1, caps[h]);
  int64_t diff = total - std::accumulate(t.begin(), t.end(), int64_t{0});
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  auto frac = [&](size_t h) { return x[h] - static_cast<double>(t[h]); };
  if (diff > 0) {
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return frac(a) > frac(b); });
    while (diff > 0) {
      bool moved = false;
      for (size_t h : order) {
        if (diff == 0) break;
        if (t[h] < caps[h]) ++t[h], --diff, moved = true;
      }
      if (!moved) break;
    }
  } else if (diff < 0) {
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return frac(a) < frac(b); });
    while (diff < 0) {
      bool moved = false;
      for (size_t h : order) {
        if (diff == 0) break;
        if (t[h] > 1) --t[h], ++diff, moved = true;
      }
      if (!moved) break;
    }
  }
  return t;
}

// Adds `left` entries one head at a time, round robin, where a head is below its cap (callers
// have checked the caps hold the total).
void FillUnderCaps(const std::vector<int64_t>& caps, int64_t left, std::vector<int64_t>* t) {
  while (left > 0) {
    bool moved = false;
    for (size_t h = 0; h < t->size() && left > 0; ++h) {
      if ((*t)[h] < caps[h]) ++(*t)[h], --left, moved = true;
    }
    if (!moved) return;
  }
}

}  // namespace

absl::StatusOr<std::vector<int64_t>> WaterFill(const std::vector<double>& shares,
                                               const std::vector<int64_t>& caps, int64_t total) {
  if (auto s = CheckTotal(shares.size(), caps, total); !s.ok()) return s;
  for (double s : shares) {
    if (!(s >= 0) || !std::isfinite(s)) return absl::InvalidArgumentError("shares must be finite and >= 0");
  }
  const size_t n = shares.size();
  auto filled = [&](double lambda, std::vector<double>* x) {
    double sum = 0;
    for (size_t h = 0; h < n; ++h) {
      (*x)[h] = std::clamp(lambda * shares[h], 1.0, static_cast<double>(caps[h]));
      sum += (*x)[h];
    }
    return sum;
  };
  std::vector<double> x(n);
  // sum(lambda) is continuous and non-decreasing: bisect on lambda (geometric until bracketed).
  double lo = 0, hi = 1;
  while (filled(hi, &x) < static_cast<double>(total) && hi < 1e300) hi *= 2;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    (filled(mid, &x) < static_cast<double>(total) ? lo : hi) = mid;
  }
  filled(hi, &x);
  return RoundToTotal(x, caps, total);
}

std::vector<double> PyramidShares(int64_t layers, int64_t heads_per_layer, double spread) {
  std::vector<double> shares;
  shares.reserve(static_cast<size_t>(layers * heads_per_layer));
  for (int64_t l = 0; l < layers; ++l) {
    const double w = layers > 1 ? 1.0 + (spread - 1.0) * static_cast<double>(layers - 1 - l) / (layers - 1) : 1.0;
    for (int64_t h = 0; h < heads_per_layer; ++h) shares.push_back(w);
  }
  return shares;
}

absl::StatusOr<std::vector<int64_t>> TopKAcrossHeads(const std::vector<VectorF>& scores,
                                                     const std::vector<int64_t>& caps, int64_t total) {
  if (auto s = CheckTotal(scores.size(), caps, total); !s.ok()) return s;
  std::vector<std::pair<float, int32_t>> all;  // (score, head)
  for (size_t h = 0; h < scores.size(); ++h) {
    for (Eigen::Index j = 0; j < scores[h].size(); ++j) all.push_back({scores[h][j], static_cast<int32_t>(h)});
  }
  std::stable_sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  // Every head keeps its own best key; the rest of the total goes to the highest scores overall.
  std::vector<int64_t> t(scores.size(), 1);
  std::vector<uint8_t> seen(scores.size(), 0);
  int64_t left = total - static_cast<int64_t>(scores.size());
  for (const auto& [score, h] : all) {
    if (left == 0) break;
    if (!seen[h]) {
      seen[h] = 1;
      continue;
    }
    if (t[h] < caps[h]) ++t[h], --left;
  }
  FillUnderCaps(caps, left, &t);  // heads with fewer keys than their caps ran out of keys
  return t;
}

absl::StatusOr<std::vector<int64_t>> AllocateByMarginalGain(const std::vector<ErrorCurve>& curves,
                                                            const std::vector<int64_t>& caps, int64_t total) {
  if (auto s = CheckTotal(curves.size(), caps, total); !s.ok()) return s;
  struct Segment { size_t head; int64_t from, to; double slope; };  // error decrease per token
  std::vector<Segment> segments;
  std::vector<int64_t> t(curves.size(), 1);
  for (size_t h = 0; h < curves.size(); ++h) {
    ErrorCurve c;
    for (auto [b, e] : curves[h]) {
      b = std::clamp<int64_t>(b, 1, caps[h]);
      if (!std::isfinite(e)) continue;
      if (!c.empty() && b <= c.back().first) continue;   // ascending budgets only
      if (!c.empty()) e = std::min(e, c.back().second);  // more tokens never hurt
      // Lower convex hull: drop points above the chord of their neighbours.
      while (c.size() >= 2) {
        const auto [b0, e0] = c[c.size() - 2];
        const auto [b1, e1] = c.back();
        if ((e1 - e0) * static_cast<double>(b - b0) >= (e - e0) * static_cast<double>(b1 - b0)) c.pop_back();
        else break;
      }
      c.push_back({b, e});
    }
    if (c.empty()) continue;
    t[h] = c.front().first;
    for (size_t i = 1; i < c.size(); ++i) {
      segments.push_back({h, c[i - 1].first, c[i].first,
                          (c[i - 1].second - c[i].second) / static_cast<double>(c[i].first - c[i - 1].first)});
    }
  }
  int64_t left = total - std::accumulate(t.begin(), t.end(), int64_t{0});
  if (left < 0) {  // the curves start above the total: shrink their starts in proportion
    std::vector<double> shares(t.begin(), t.end());
    return WaterFill(shares, caps, total);
  }
  // Convex curves have decreasing slopes along each head, so a global order by slope keeps each
  // head's segments in order.
  std::stable_sort(segments.begin(), segments.end(), [](const Segment& a, const Segment& b) { return a.slope > b.slope; });
  for (const Segment& s : segments) {
    if (left == 0) break;
    const int64_t take = std::min(left, s.to - s.from);
    t[s.head] += take;
    left -= take;
  }
  FillUnderCaps(caps, left, &t);  // past every curve's end
  return t;
}

namespace {

// At most `n` of the layer's queries per head (a seeded subsample), laid out as LayerData's.
std::vector<float> SampleQueries(const LayerData& d, int64_t n, uint64_t seed) {
  std::vector<int64_t> rows(d.queries);
  std::iota(rows.begin(), rows.end(), 0);
  std::shuffle(rows.begin(), rows.end(), std::mt19937_64(seed ^ 0x5eed5eedull));
  rows.resize(static_cast<size_t>(std::min(n, d.queries)));
  std::sort(rows.begin(), rows.end());
  const int64_t m = static_cast<int64_t>(rows.size());
  std::vector<float> out(static_cast<size_t>(d.heads * m * d.head_dim));
  for (int64_t h = 0; h < d.heads; ++h) {
    for (int64_t i = 0; i < m; ++i) {
      const float* src = d.query_data.data() + (h * d.queries + rows[i]) * d.head_dim;
      std::copy(src, src + d.head_dim, out.data() + (h * m + i) * d.head_dim);
    }
  }
  return out;
}

}  // namespace

absl::Status AllocateLayer(Backend& backend, LayerJob* job, const LayerAllocation& rule) {
  if (rule.kind == LayerAllocation::Kind::kNone) return absl::OkStatus();
  const LayerData& d = job->data;
  if (d.queries == 0) return absl::InvalidArgumentError("budget allocation by scores or sensitivity needs reference queries");
  const int64_t H = d.heads;
  const int64_t total = std::accumulate(job->budgets.begin(), job->budgets.end(), int64_t{0});
  std::vector<int64_t> caps(H, std::max<int64_t>(1, static_cast<int64_t>(std::floor(rule.head_cap * d.tokens))));
  const int64_t room = std::accumulate(caps.begin(), caps.end(), int64_t{0});
  if (total > room) {
    return absl::InvalidArgumentError(absl::StrCat("the layer's total budget ", total, " exceeds the head caps (",
                                                   rule.head_cap, " x T per head)"));
  }
  const int64_t m = std::min(rule.probe_queries, d.queries);
  std::vector<float> sampled = SampleQueries(d, m, job->options.seed);
  absl::StatusOr<std::vector<int64_t>> budgets;
  if (rule.kind == LayerAllocation::Kind::kGlobalTopK) {
    const ScoreReduce reduce = job->options.score.value_or(ScoreReduce::kMax);  // KVzip: max over queries
    std::vector<VectorF> scores(H);
    for (int64_t h = 0; h < H; ++h) {
      const MatrixF q = ConstMatrixMapF(sampled.data() + h * m * d.head_dim, m, d.head_dim);
      scores[h] = ComputeAttentionStats(d.HeadBlock(h), q, reduce, job->options.query_chunk).scores;
    }
    budgets = TopKAcrossHeads(scores, caps, total);
  } else {
    // The backend compacts a copy of the layer with the sampled queries at five budgets.
    LayerJob probe;
    probe.options = job->options;
    probe.first_head = job->first_head;
    probe.cancelled = job->cancelled;
    probe.data = LayerData{d.layer, d.heads, d.tokens, m, d.head_dim, d.value_dim, d.scale,
                           d.keys, d.values, d.bias, std::move(sampled), d.inputs_dtype};
    if (GetMethodSpec(probe.options.method).selection == Selection::kOmp) probe.options.method = Method::kAmHighestAttention;
    if (probe.options.holdout_fraction <= 0) probe.options.holdout_fraction = 0.25;
    const int64_t nominal = std::max<int64_t>(1, total / H);
    std::vector<ErrorCurve> curves(H);
    for (double f : {0.25, 0.5, 1.0, 2.0, 4.0}) {
      const int64_t b = std::clamp<int64_t>(static_cast<int64_t>(std::llround(f * nominal)), 1, caps[0]);
      probe.budgets.assign(H, b);
      absl::StatusOr<LayerResult> r = backend.CompactLayer(probe);
      if (!r.ok()) return r.status();
      for (int64_t h = 0; h < H; ++h) curves[h].push_back({b, r->heads[h].quality.output_rel_error});
    }
    budgets = AllocateByMarginalGain(curves, caps, total);
  }
  if (!budgets.ok()) return budgets.status();
  job->budgets = *std::move(budgets);
  return absl::OkStatus();
}

}  // namespace kvcompact
