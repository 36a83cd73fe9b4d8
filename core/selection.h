// Key selection rules: which t of the T cached tokens a compacted block keeps.
#pragma once

#include <cstdint>
#include <vector>

#include "core/method.h"
#include "core/types.h"

namespace kvcompact {

struct SelectionParams {
  int64_t budget = 0;        // t, 0 < t < T
  int pool_kernel = 0;       // max pooling of scores over positions; 0/1 = none
  int sink_tokens = 4;       // sinks-and-recent only
  uint64_t seed = 0;         // random only
};

// 1-D max pooling with a centred odd window (SnapKV-like smoothing of key scores).
VectorF MaxPool1d(const VectorF& scores, int kernel);

// The t indices with the highest scores, ascending by position. Ties break towards earlier tokens.
std::vector<int32_t> TopK(const VectorF& scores, int64_t t);

struct HeadOptions;
struct MethodSpec;
// The selection parameters of a head: its options, with the method's defaults filled in.
SelectionParams SelectionParamsFor(const HeadOptions& options, const MethodSpec& spec, int64_t budget);

// Returns ascending token indices. `scores` is used by highest-attention selection only.
std::vector<int32_t> SelectKeys(Selection rule, int64_t tokens, const VectorF& scores,
                                const SelectionParams& params);

}  // namespace kvcompact
