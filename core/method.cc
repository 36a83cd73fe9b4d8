#include "core/method.h"

namespace kvcompact {
namespace {
constexpr double kOmpLogWeightMin = -27.631021115928547;  // log(1e-12)
}  // namespace

const std::vector<MethodSpec>& AllMethods() {
  static const std::vector<MethodSpec> kMethods = {
      {Method::kAmHighestAttention, "am", Selection::kHighestAttention, Fit::kAttentionMatching,
       ScoreReduce::kRms, 0, true},
      {Method::kTruncateRecent, "recent", Selection::kRecent, Fit::kCopy, ScoreReduce::kMean, 0,
       false},
      {Method::kStreamingLlm, "streaming_llm", Selection::kSinksAndRecent, Fit::kCopy,
       ScoreReduce::kMean, 0, false},
      {Method::kH2O, "h2o", Selection::kHighestAttention, Fit::kCopy, ScoreReduce::kMean, 0, true},
      {Method::kSnapKV, "snapkv", Selection::kHighestAttention, Fit::kCopy, ScoreReduce::kMean, 7,
       true},
      {Method::kRandom, "random", Selection::kRandom, Fit::kCopy, ScoreReduce::kMean, 0, false},
      // OMP ranks its candidate pool by RMS attention; the greedy loop itself uses the mass system.
      {Method::kAmOmp, "am_omp", Selection::kOmp, Fit::kAttentionMatching, ScoreReduce::kRms, 0, true,
       kOmpLogWeightMin, 7.0, 1, 1},
      {Method::kAmOmpFast, "am_omp_fast", Selection::kOmp, Fit::kAttentionMatching, ScoreReduce::kRms, 0,
       true, kOmpLogWeightMin, 7.0, 4, 2},
  };
  return kMethods;
}

const MethodSpec& GetMethodSpec(Method method) {
  for (const MethodSpec& spec : AllMethods()) {
    if (spec.method == method) return spec;
  }
  return AllMethods().front();
}

std::optional<Method> MethodFromName(std::string_view name) {
  for (const MethodSpec& spec : AllMethods()) {
    if (spec.name == name) return spec.method;
  }
  return std::nullopt;
}

std::string_view ScoreReduceName(ScoreReduce reduce) {
  switch (reduce) {
    case ScoreReduce::kRms: return "RMS";
    case ScoreReduce::kMean: return "MEAN";
    case ScoreReduce::kMax: return "MAX";
    case ScoreReduce::kRmsMax: return "RMS_MAX";
    case ScoreReduce::kCoverage: return "COVERAGE";
    case ScoreReduce::kRmsCoverage: return "RMS_COVERAGE";
  }
  return "UNKNOWN";
}

std::optional<ScoreReduce> ScoreReduceFromName(std::string_view name) {
  for (ScoreReduce r : {ScoreReduce::kRms, ScoreReduce::kMean, ScoreReduce::kMax, ScoreReduce::kRmsMax,
                        ScoreReduce::kCoverage, ScoreReduce::kRmsCoverage}) {
    if (ScoreReduceName(r) == name) return r;
  }
  return std::nullopt;
}

}  // namespace kvcompact
