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
  kAmOmp = 7,
  kAmOmpFast = 8,
};

// kRmsMax: the union of the RMS and the max rankings (a key ranks by the better of its two
// places), so that keys one query needs strongly compete beside keys many queries use a little.
// kCoverage: the number of queries whose most-attended key it is (ties by RMS), so that the kept
// keys cover as many queries' top key as the budget allows. kRmsCoverage: the union of the RMS and
// the coverage rankings.
enum class ScoreReduce : int { kRms = 1, kMean = 2, kMax = 3, kRmsMax = 4, kCoverage = 5, kRmsCoverage = 6 };

// The score's name on the wire (the proto's SCORE_REDUCE_ suffix), for messages and flags.
std::string_view ScoreReduceName(ScoreReduce reduce);
std::optional<ScoreReduce> ScoreReduceFromName(std::string_view name);

enum class Selection : int { kHighestAttention, kRecent, kSinksAndRecent, kRandom, kOmp };
enum class Fit : int { kAttentionMatching, kCopy };

struct MethodSpec {
  Method method;
  std::string_view name;       // stable, lower-case: used in flags, files and metrics
  Selection selection;
  Fit fit;
  ScoreReduce default_score;   // highest-attention selection only
  int default_pool_kernel;     // 0/1 = no pooling
  bool needs_queries;          // selection or fit uses the reference queries
  // Bounds on log w in the mass fit (spec: [-3, 3] for highest attention, [log 1e-12, 7] for OMP).
  double default_beta_min = -3.0, default_beta_max = 3.0;
  int omp_keys_per_step = 0;   // OMP selection only: k and the refit interval
  int omp_refit_interval = 0;
};

const MethodSpec& GetMethodSpec(Method method);
// Whether the selection needs per-key attention scores (highest attention; OMP ranks its
// candidate pool by them).
inline bool UsesKeyScores(const MethodSpec& spec) {
  return spec.selection == Selection::kHighestAttention || spec.selection == Selection::kOmp;
}
std::optional<Method> MethodFromName(std::string_view name);
const std::vector<MethodSpec>& AllMethods();

}  // namespace kvcompact
