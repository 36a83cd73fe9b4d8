// Compaction methods: a key-selection rule plus a fit rule. Every method goes through the same
// pipeline (compact_head.cc); baselines differ only in the entries of this table.
#pragma once

#include <optional>
#include <string_view>
#include <vector>

namespace kvcompact {

enum class Method : int {
  kAmHighestAttention = 1,
  kTruncateRecent = 2,
  kStreamingLlm = 3,
  kH2O = 4,
  kSnapKV = 5,
  kRandom = 6,
};

enum class ScoreReduce : int { kRms = 1, kMean = 2, kMax = 3 };

enum class Selection : int { kHighestAttention, kRecent, kSinksAndRecent, kRandom };
enum class Fit : int { kAttentionMatching, kCopy };

struct MethodSpec {
  Method method;
  std::string_view name;       // stable, lower-case: used in flags, files and metrics
  Selection selection;
  Fit fit;
  ScoreReduce default_score;   // highest-attention selection only
  int default_pool_kernel;     // 0/1 = no pooling
  bool needs_queries;          // selection or fit uses the reference queries
};

const MethodSpec& GetMethodSpec(Method method);
std::optional<Method> MethodFromName(std::string_view name);
const std::vector<MethodSpec>& AllMethods();

}  // namespace kvcompact
