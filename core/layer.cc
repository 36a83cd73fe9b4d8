#include "core/layer.h"

#include <cmath>

#include "core/attention.h"

namespace kvcompact {

void LayerData::Allocate(bool with_bias) {
  keys.assign(static_cast<size_t>(heads * tokens * head_dim), 0.0f);
  values.assign(static_cast<size_t>(heads * tokens * value_dim), 0.0f);
  bias.assign(with_bias ? static_cast<size_t>(heads * tokens) : 0, 0.0f);
  query_data.assign(static_cast<size_t>(heads * queries * head_dim), 0.0f);
}

BlockView LayerData::HeadBlock(int64_t head) const {
  return BlockView{
      ConstMatrixMapF(keys.data() + head * tokens * head_dim, tokens, head_dim),
      ConstMatrixMapF(values.data() + head * tokens * value_dim, tokens, value_dim),
      bias.empty() ? nullptr : bias.data() + head * tokens, scale};
}

MatrixF LayerData::HeadQueries(int64_t head) const {
  return ConstMatrixMapF(query_data.data() + head * queries * head_dim, queries, head_dim);
}

HeadOptions HeadOptionsFor(const LayerJob& job, int64_t head) {
  HeadOptions options = job.options;
  options.budget = job.budgets[head];
  options.seed = job.options.seed + static_cast<uint64_t>(job.data.layer) * 1000003u +
                 static_cast<uint64_t>(job.first_head + head);
  return options;
}

LayerJob SliceHeads(const LayerJob& job, int64_t begin, int64_t end) {
  const LayerData& d = job.data;
  LayerJob out;
  out.options = job.options;
  out.first_head = job.first_head + begin;
  out.cancelled = job.cancelled;
  out.budgets.assign(job.budgets.begin() + begin, job.budgets.begin() + end);
  out.data = LayerData{d.layer, end - begin, d.tokens, d.queries, d.head_dim, d.value_dim, d.scale, {}, {}, {}, {}};
  auto slice = [&](const std::vector<float>& v, int64_t per_head) {
    if (v.empty()) return std::vector<float>();
    return std::vector<float>(v.begin() + begin * per_head, v.begin() + end * per_head);
  };
  out.data.keys = slice(d.keys, d.tokens * d.head_dim);
  out.data.values = slice(d.values, d.tokens * d.value_dim);
  out.data.bias = slice(d.bias, d.tokens);
  out.data.query_data = slice(d.query_data, d.queries * d.head_dim);
  out.data.inputs_dtype = d.inputs_dtype;
  return out;
}


namespace {

bool AllWithin(const float* v, int64_t n, float max_abs) {
  for (int64_t i = 0; i < n; ++i) {
    if (!(std::fabs(v[i]) <= max_abs)) return false;  // also false for NaN
  }
  return true;
}

bool QualityFinite(const HeadQuality& q) {
  return std::isfinite(q.output_rel_error) && std::isfinite(q.mass_rel_error) && std::isfinite(q.fit_output_rel_error);
}

}  // namespace

int64_t ReplaceNonFiniteHeads(const LayerJob& job, float max_abs, LayerResult* result) {
  const LayerData& d = job.data;
  int64_t replaced = 0;
  for (size_t h = 0; h < result->heads.size() && static_cast<int64_t>(h) < d.heads; ++h) {
    CompactedHead& head = result->heads[h];
    const bool fit_ok = AllWithin(head.keys.data(), head.keys.size(), max_abs) &&
                        AllWithin(head.beta.data(), head.beta.size(), 3.0e38f) &&
                        AllWithin(head.values.data(), head.values.size(), max_abs);
    if (fit_ok && (!head.quality.has_quality || QualityFinite(head.quality))) continue;
    const BlockView block = d.HeadBlock(static_cast<int64_t>(h));
    if (!fit_ok) {
      ++replaced;
      head.selection_kept = true;
      const auto t = static_cast<Eigen::Index>(head.indices.size());
      head.beta.resize(t);
      head.values.resize(t, d.value_dim);
      for (Eigen::Index r = 0; r < t; ++r) {
        head.beta[r] = block.bias ? block.bias[head.indices[r]] : 0.0f;
        head.values.row(r) = block.values.row(head.indices[r]);
      }
    }
    if (head.quality.has_quality && d.queries > 0) {
      const MatrixF queries = d.HeadQueries(static_cast<int64_t>(h));
      const AttentionStats truth = ComputeAttentionStats(block, queries, std::nullopt, 256);
      MeasureErrors(head, queries, truth, block.scale, &head.quality.output_rel_error, &head.quality.mass_rel_error);
      head.quality.fit_output_rel_error = head.quality.output_rel_error;
      head.quality.eval_queries = queries.rows();
      if (!QualityFinite(head.quality)) head.quality = HeadQuality{};
    }
  }
  return replaced;
}

}  // namespace kvcompact
