// One (layer, KV head) block: its options, its compacted result, and the helpers of the pipeline's
// steps (query split, the fits' priors, error figures). CompactHead runs the pipeline
// (core/pipeline.h) on one block with the CPU's steps.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/attention.h"
#include "core/fit.h"
#include "core/method.h"
#include "core/omp.h"
#include "core/types.h"

namespace kvcompact {

struct HeadOptions {
  Method method = Method::kAmHighestAttention;
  int64_t budget = 0;                       // t; >= T returns the block unchanged
  std::optional<ScoreReduce> score;         // default: the method's
  int pool_kernel = -1;                     // -1: the method's default
  int sink_tokens = 4;
  uint64_t seed = 0;
  // Priors of the fits toward plain selection, relative to the mean diagonal of each Gram matrix:
  // the mass fit minimises ||Phi w - m||^2 + mass_prior * mean(diag(G)) * ||w - 1||^2 (w = 1 is
  // beta = b[S]), the value fit ||X C - Y||^2 + ridge * mean(diag(X^T X)) * ||C - V[S]||^2.
  // Directions the fitting queries do not constrain (n < t, near-duplicate queries) keep the
  // selection's values instead of arbitrary ones (bench_fit_range: without them the fit lost to
  // selection on held-out queries for n <= t/2). 0: the defaults below at full strength for
  // n <= t, fading linearly to none at n >= 2t (the value ridge then stays at kMinValueRidge);
  // > 0: that strength as given; mass_prior < 0: none.
  double ridge = 0;
  double mass_prior = 0;
  std::optional<double> beta_min, beta_max; // bounds on log w in the mass fit; default: the method's
  // OMP selection (spec section 3); 0 = the method's preset (am_omp: k=1/interval 1, am_omp_fast: 4/2).
  int omp_keys_per_step = 0;
  int omp_refit_interval = 0;
  double omp_progressive = 0;               // > 0: k grows to ceil(fraction * |S|) as S grows
  // OMP candidates: the keys of highest RMS attention. 0 = min(T, max(10t, 2048)); >= T = every key.
  int64_t omp_pool = 0;
  double holdout_fraction = 0.1;
  int query_chunk = 256;
  bool force_fit = false;                   // fit even when t >= T (tests of the fit itself)
  MassFitSolver mass_fit_solver = MassFitSolver::kBackendDefault;  // not on the wire: tests and benchmarks
};

inline constexpr double kDefaultValueRidge = 1e-2;
inline constexpr double kMinValueRidge = 1e-5;
inline constexpr double kDefaultMassPrior = 1e-3;
// The strengths the fits use for a budget t and n_fit fitting queries (HeadOptions::ridge, mass_prior).
double ValueRidge(const HeadOptions& options, int64_t t, int64_t n_fit);
double MassPrior(const HeadOptions& options, int64_t t, int64_t n_fit);

// Bounds [lo, hi] on w = exp(log w) in the mass fit: the options' or the method's defaults.
std::pair<double, double> WeightBounds(const HeadOptions& options, const MethodSpec& spec);

// A budget of at least T returns the block as it is (unless the fit itself is being tested).
inline bool KeepsBlockUnchanged(const HeadOptions& options, int64_t tokens) {
  return options.budget >= tokens && !options.force_fit;
}

// The default OMP pool is this many candidates per kept key (at least 2,048): on BENCH-A heads
// (T = 60,000, t = 1,200, H200, 2026-12-01) am_omp_fast's held-out error was 0.0600 with 4t,
// 0.0556 with 10t and 0.0564 with 20t candidates, for 1.8, 4.7 and 14.4 s per layer.
inline constexpr int64_t kDefaultOmpPoolPerKey = 10;
// How many candidates OMP ranks for a budget t of T tokens.
int64_t OmpPoolSize(int64_t pool_option, int64_t t, int64_t T);
// OMP's candidate pool for budget t: the OmpPoolSize keys of highest score (all T when it covers
// them), ascending. Both backends choose it this way.
std::vector<int32_t> OmpCandidates(const VectorF& scores, int64_t tokens, int64_t t, int64_t pool_option);
// The greedy loop's parameters for a head: its options over the method's preset.
OmpParams OmpParamsFor(const HeadOptions& options, const MethodSpec& spec, int64_t t);

// The fit error is a diagnostic: measured on at most this many of the fitting queries.
inline constexpr int64_t kFitErrorQueries = 1024;

struct HeadQuality {
  bool has_quality = false;
  float output_rel_error = 0;      // held-out queries (all queries if none held out)
  float mass_rel_error = 0;
  float fit_output_rel_error = 0;  // the first kFitErrorQueries queries used for fitting
  int64_t eval_queries = 0;
};

struct CompactedHead {
  std::vector<int32_t> indices;  // ascending kept token positions
  MatrixF keys;                  // t x d   (= K[S])
  VectorF beta;                  // t
  MatrixF values;                // t x dv
  HeadQuality quality;
  // The fit did worse than plain selection of the same keys on the held-out queries, so the head
  // is returned as the selection (beta = b[S], C_v = V[S]) with that one's figures.
  bool selection_kept = false;
  bool mass_fit_converged = true;
  int mass_fit_iterations = 0;   // bounded-NNLS iterations (most over chunks); 0: no mass fit
};

struct StageSeconds {
  double score = 0, mass_fit = 0, value_fit = 0, evaluate = 0;
  // Parts of the stages above, where a backend measures them: host-to-device copies (in score)
  // and the bounded NNLS itself (in mass_fit).
  double upload = 0, mass_solve = 0;
  StageSeconds& operator+=(const StageSeconds& o) {
    score += o.score; mass_fit += o.mass_fit; value_fit += o.value_fit; evaluate += o.evaluate;
    upload += o.upload; mass_solve += o.mass_solve;
    return *this;
  }
};

// `queries` may be null only for methods that do not need them (quality is then not reported).
absl::StatusOr<CompactedHead> CompactHead(const BlockView& block, const MatrixF* queries,
                                          const HeadOptions& options, StageSeconds* seconds);

// m's rows at `rows`, in that order (kept keys, their values, a query subset).
MatrixF GatherRows(const Eigen::Ref<const MatrixF>& m, const std::vector<int32_t>& rows);
// The block's bias at `positions` (0 where the block has none: a fresh cache).
VectorF GatherBias(const BlockView& block, const std::vector<int32_t>& positions);

// Fitting queries that are not near-duplicates of one another: cells of a fixed 4-dimensional
// random projection, 1/20 of each projection's spread wide. The priors toward selection scale
// with this count, since repeated queries constrain the fit no more than one of them. O(n d).
int64_t DistinctQueryCount(const Eigen::Ref<const MatrixF>& queries);

// Held-out split: a seeded random subset of floor(n * fraction) queries (at least one query is
// kept for fitting); both backends use it so that they see the same queries.
void SplitQueries(const MatrixF& queries, double fraction, uint64_t seed, MatrixF* fit, MatrixF* eval);
// How many of n queries that split holds out: floor(n * fraction), leaving at least one to fit.
int64_t HeldOutQueryCount(int64_t n, double fraction);
// The rows of that split, each ascending (for callers that gather the rows themselves).
void SplitQueryRows(int64_t n, double fraction, uint64_t seed, std::vector<int32_t>* fit_rows,
                    std::vector<int32_t>* eval_rows);

// Relative output error ||Y_hat - Y|| / ||Y|| and mean relative mass error |m_hat - m| / m.
void ErrorsFromOutputs(const MatrixF& outputs, const VectorF& mass, const MatrixF& true_outputs,
                       const VectorF& true_mass, float* output_rel_error, float* mass_rel_error);

// Output and mass errors of a compacted block on queries whose full-block stats are known.
void MeasureErrors(const CompactedHead& head, const MatrixF& queries, const AttentionStats& truth,
                   float scale, float* output_rel_error, float* mass_rel_error);

}  // namespace kvcompact
