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
  options.seed = job.options.seed + static_cast<uint64_t>(job.data.layer) * 1000003u + head;
  return options;
}


}  // namespace kvcompact
