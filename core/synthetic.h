// Generated attention blocks for self-tests, benchmarks and tests. Keys have the traits that make
// compaction non-trivial: a few heavy-hitter tokens, locally correlated neighbours (so pooling
// matters), and queries that attend unevenly (logit std around 2).
#pragma once

#include <cstdint>

#include "core/layer.h"

namespace kvcompact {

struct SyntheticShape {
  int64_t heads = 2, tokens = 1024, queries = 512, head_dim = 64, value_dim = 64;
};

LayerData MakeSyntheticLayer(const SyntheticShape& shape, uint64_t seed, int32_t layer = 0);

}  // namespace kvcompact
