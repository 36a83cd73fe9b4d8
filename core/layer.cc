#include "core/layer.h"

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
  return out;
}


}  // namespace kvcompact
