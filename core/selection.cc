#include "core/selection.h"

#include "core/compact_head.h"

#include <algorithm>
#include <numeric>
#include <random>

namespace kvcompact {

VectorF MaxPool1d(const VectorF& scores, int kernel) {
  if (kernel <= 1) return scores;
  const Eigen::Index n = scores.size();
  const Eigen::Index half = kernel / 2;
  VectorF pooled(n);
  for (Eigen::Index j = 0; j < n; ++j) {
    const Eigen::Index lo = std::max<Eigen::Index>(0, j - half);
    const Eigen::Index hi = std::min<Eigen::Index>(n - 1, j + half);
    pooled[j] = scores.segment(lo, hi - lo + 1).maxCoeff();
  }
  return pooled;
}

std::vector<int32_t> TopK(const VectorF& scores, int64_t t) {
  std::vector<int32_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  // Equal scores go to the earlier token, as the float64 reference and the method's research code do.
  auto better = [&](int32_t a, int32_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
  };
  std::nth_element(order.begin(), order.begin() + t, order.end(), better);
  order.resize(t);
  std::sort(order.begin(), order.end());
  return order;
}

SelectionParams SelectionParamsFor(const HeadOptions& options, const MethodSpec& spec, int64_t budget) {
  SelectionParams params;
  params.budget = budget;
  params.pool_kernel = options.pool_kernel >= 0 ? options.pool_kernel : spec.default_pool_kernel;
  params.sink_tokens = options.sink_tokens;
  params.seed = options.seed;
  return params;
}

std::vector<int32_t> SelectKeys(Selection rule, int64_t tokens, const VectorF& scores,
                                const SelectionParams& params) {
  const int64_t t = params.budget;
  std::vector<int32_t> kept;
  kept.reserve(t);
  switch (rule) {
    case Selection::kOmp:  // OMP selects in compact_head.cc / the CUDA backend; its pool is ranked so
    case Selection::kHighestAttention:
      return TopK(MaxPool1d(scores, params.pool_kernel), t);
    case Selection::kRecent:
      for (int64_t j = tokens - t; j < tokens; ++j) kept.push_back(static_cast<int32_t>(j));
      return kept;
    case Selection::kSinksAndRecent: {
      const int64_t sinks = std::min<int64_t>(params.sink_tokens, t);
      for (int64_t j = 0; j < sinks; ++j) kept.push_back(static_cast<int32_t>(j));
      for (int64_t j = tokens - (t - sinks); j < tokens; ++j) kept.push_back(static_cast<int32_t>(j));
      return kept;
    }
    case Selection::kRandom: {
      std::vector<int32_t> all(tokens);
      std::iota(all.begin(), all.end(), 0);
      std::mt19937_64 rng(params.seed);
      // Partial Fisher-Yates: the first t entries become a uniform sample.
      for (int64_t i = 0; i < t; ++i) {
        std::uniform_int_distribution<int64_t> pick(i, tokens - 1);
        std::swap(all[i], all[pick(rng)]);
      }
      all.resize(t);
      std::sort(all.begin(), all.end());
      return all;
    }
  }
  return kept;
}

}  // namespace kvcompact
