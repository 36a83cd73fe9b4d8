#include "core/synthetic.h"

#include <cmath>
#include <random>

namespace kvcompact {
namespace {
// Chosen so that attention is peaked as in trained models (row entropy well below log T).
constexpr float kKeyStd = 1.2f, kQueryStd = 1.2f, kHeavy = 0.6f;
}  // namespace

LayerData MakeSyntheticLayer(const SyntheticShape& shape, uint64_t seed, int32_t layer) {
  LayerData data;
  data.layer = layer;
  data.heads = shape.heads;
  data.tokens = shape.tokens;
  data.queries = shape.queries;
  data.head_dim = shape.head_dim;
  data.value_dim = shape.value_dim;
  data.scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
  data.Allocate(/*with_bias=*/false);

  std::mt19937_64 rng(seed * 7919 + static_cast<uint64_t>(layer));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  const int64_t d = shape.head_dim, dv = shape.value_dim;
  for (int64_t h = 0; h < shape.heads; ++h) {
    std::vector<float> drift(d, 0.0f), topic(d), value_mean(dv);
    for (float& x : topic) x = normal(rng);
    for (float& x : value_mean) x = normal(rng);  // values share a head-specific offset, as in real caches
    float* k = data.keys.data() + h * shape.tokens * d;
    float* v = data.values.data() + h * shape.tokens * dv;
    for (int64_t j = 0; j < shape.tokens; ++j) {
      const bool heavy = uniform(rng) < 0.02f;  // heavy hitters align with the query topic
      for (int64_t c = 0; c < d; ++c) {
        drift[c] = 0.9f * drift[c] + 0.45f * normal(rng);  // neighbours share a slow component
        k[j * d + c] = kKeyStd * normal(rng) + drift[c] + (heavy ? kHeavy * topic[c] : 0.0f);
      }
      for (int64_t c = 0; c < dv; ++c) v[j * dv + c] = value_mean[c] + normal(rng);
    }
    float* q = data.query_data.data() + h * shape.queries * d;
    for (int64_t i = 0; i < shape.queries; ++i) {
      for (int64_t c = 0; c < d; ++c) q[i * d + c] = kQueryStd * normal(rng) + 0.5f * topic[c];
    }
  }
  return data;
}

}  // namespace kvcompact
