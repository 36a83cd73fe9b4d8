// A generated layer as a job with the same budget for every head (core tests).
#pragma once

#include <cstdint>

#include "core/layer.h"
#include "core/synthetic.h"

namespace kvcompact::testing {

inline LayerJob SyntheticJob(int64_t heads, int64_t tokens, int64_t queries, int64_t budget, uint64_t seed) {
  SyntheticShape shape;
  shape.heads = heads;
  shape.tokens = tokens;
  shape.queries = queries;
  LayerJob job;
  job.data = MakeSyntheticLayer(shape, seed);
  job.budgets.assign(heads, budget);
  return job;
}

}  // namespace kvcompact::testing
