#include "core/compact_head.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <tuple>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "core/cpu_steps.h"
#include "core/layer.h"
#include "core/pipeline.h"
#include "core/selection.h"

namespace kvcompact {

VectorF GatherBias(const BlockView& block, const std::vector<int32_t>& positions) {
  VectorF out(static_cast<Eigen::Index>(positions.size()));
  for (size_t i = 0; i < positions.size(); ++i) out[i] = block.bias ? block.bias[positions[i]] : 0.0f;
  return out;
}

MatrixF GatherRows(const Eigen::Ref<const MatrixF>& m, const std::vector<int32_t>& rows) {
  MatrixF out(static_cast<Eigen::Index>(rows.size()), m.cols());
  for (size_t i = 0; i < rows.size(); ++i) out.row(i) = m.row(rows[i]);
  return out;
}

namespace {
// Full strength while the fitting queries are at most t, none from 2t on, linear between: with
// plenty of queries even a weak pull toward selection cost held-out accuracy (BENCH-A on the
// GPU, n = 6t: +50% error at min(1, 2t / n) scaling), while below t it is what keeps the fit
// ahead of selection (bench_fit_range).
double DataScale(int64_t t, int64_t n_fit) {
  if (n_fit <= 0) return 1.0;
  return std::clamp((2.0 * static_cast<double>(t) - static_cast<double>(n_fit)) / static_cast<double>(t), 0.0, 1.0);
}
}  // namespace

double ValueRidge(const HeadOptions& options, int64_t t, int64_t n_fit) {
  return options.ridge > 0 ? options.ridge : std::max(kMinValueRidge, kDefaultValueRidge * DataScale(t, n_fit));
}

double MassPrior(const HeadOptions& options, int64_t t, int64_t n_fit) {
  if (options.mass_prior < 0) return 0;
  return options.mass_prior > 0 ? options.mass_prior : kDefaultMassPrior * DataScale(t, n_fit);
}

std::pair<double, double> WeightBounds(const HeadOptions& options, const MethodSpec& spec) {
  return {std::exp(options.beta_min.value_or(spec.default_beta_min)),
          std::exp(options.beta_max.value_or(spec.default_beta_max))};
}

int64_t OmpPoolSize(int64_t pool_option, int64_t t, int64_t T) {
  if (pool_option > 0) return std::clamp(pool_option, t, T);
  return std::min(T, std::max<int64_t>(kDefaultOmpPoolPerKey * t, 2048));
}

std::vector<int32_t> OmpCandidates(const VectorF& scores, int64_t tokens, int64_t t, int64_t pool_option) {
  const int64_t size = OmpPoolSize(pool_option, t, tokens);
  if (size < tokens) return TopK(scores, size);
  std::vector<int32_t> all(tokens);
  std::iota(all.begin(), all.end(), 0);
  return all;
}

OmpParams OmpParamsFor(const HeadOptions& options, const MethodSpec& spec, int64_t t) {
  OmpParams params;
  params.budget = t;
  params.keys_per_step = options.omp_keys_per_step > 0 ? options.omp_keys_per_step : spec.omp_keys_per_step;
  params.refit_interval = options.omp_refit_interval > 0 ? options.omp_refit_interval : spec.omp_refit_interval;
  params.progressive = options.omp_progressive;
  std::tie(params.w_lo, params.w_hi) = WeightBounds(options, spec);
  return params;
}

int64_t DistinctQueryCount(const Eigen::Ref<const MatrixF>& queries) {
  const Eigen::Index n = queries.rows(), d = queries.cols();
  if (n <= 1 || d == 0) return n;
  constexpr int kDirections = 4;
  constexpr double kCellWidth = 0.05;  // of each projection's standard deviation
  std::mt19937_64 rng(0x6b76636f6d70ull);
  std::normal_distribution<float> normal;
  MatrixF directions(d, kDirections);
  for (Eigen::Index i = 0; i < directions.size(); ++i) directions.data()[i] = normal(rng);
  const MatrixF projected = queries * directions;
  double step[kDirections];
  for (int k = 0; k < kDirections; ++k) {
    const auto col = projected.col(k).cast<double>();
    const double mean = col.mean();
    const double sd = std::sqrt((col.array() - mean).square().sum() / static_cast<double>(n));
    const double rms = std::sqrt(col.array().square().mean());
    // At least 1e-5 of the projections' size: equal rows can differ by the product's rounding.
    step[k] = std::max(kCellWidth * sd, 1e-5 * rms);
    if (!(step[k] > 0)) step[k] = 1.0;
  }
  std::unordered_set<uint64_t> cells;
  for (Eigen::Index i = 0; i < n; ++i) {
    uint64_t hash = 1469598103934665603ull;  // FNV-1a over the cell coordinates
    for (int k = 0; k < kDirections; ++k) {
      // The grid is offset so that no cell edge sits at a round multiple of the step.
      const auto cell = static_cast<int64_t>(std::floor(projected(i, k) / step[k] + 0.381966));
      hash = (hash ^ static_cast<uint64_t>(cell)) * 1099511628211ull;
    }
    cells.insert(hash);
  }
  return static_cast<int64_t>(cells.size());
}

int64_t HeldOutQueryCount(int64_t n, double fraction) {
  return std::clamp<int64_t>(static_cast<int64_t>(std::floor(n * fraction)), 0, std::max<int64_t>(n - 1, 0));
}

void SplitQueryRows(int64_t n, double fraction, uint64_t seed, std::vector<int32_t>* fit_rows,
                    std::vector<int32_t>* eval_rows) {
  const int64_t n_eval = HeldOutQueryCount(n, fraction);
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (n_eval > 0) std::shuffle(order.begin(), order.end(), std::mt19937_64(seed ^ 0x9e3779b97f4a7c15ull));
  eval_rows->assign(order.begin(), order.begin() + n_eval);
  fit_rows->assign(order.begin() + n_eval, order.end());
  std::sort(eval_rows->begin(), eval_rows->end());
  std::sort(fit_rows->begin(), fit_rows->end());
}

void SplitQueries(const MatrixF& q, double fraction, uint64_t seed, MatrixF* fit, MatrixF* eval) {
  std::vector<int32_t> fit_rows, eval_rows;
  SplitQueryRows(q.rows(), fraction, seed, &fit_rows, &eval_rows);
  if (eval_rows.empty()) {
    *fit = q;
    *eval = MatrixF(0, q.cols());
    return;
  }
  *fit = GatherRows(q, fit_rows);
  *eval = GatherRows(q, eval_rows);
}

void MeasureErrors(const CompactedHead& head, const MatrixF& queries, const AttentionStats& truth,
                   float scale, float* output_rel_error, float* mass_rel_error) {
  // Shifted by the compacted rows' own maxima: kept keys far below the full row's maximum would
  // underflow in fp32 (exp(-87)) and zero the outputs; the mass exp(M_S - M) * sum is formed in fp64.
  const MatrixF logits = SubsetLogits(queries, head.keys, head.beta, scale);
  const VectorF sub_max = logits.rowwise().maxCoeff();
  const MatrixF probs = (logits.colwise() - sub_max).array().exp().matrix();
  const VectorF sums = probs.rowwise().sum();
  MatrixF outputs = probs * head.values;
  outputs.array().colwise() /= sums.array();
  VectorF mass(sums.size());
  for (Eigen::Index i = 0; i < sums.size(); ++i) {
    const double m = std::exp(static_cast<double>(sub_max[i]) - static_cast<double>(truth.row_max[i])) * sums[i];
    mass[i] = static_cast<float>(std::max(m, 1e-30));
  }
  ErrorsFromOutputs(outputs, mass, truth.outputs, truth.mass, output_rel_error, mass_rel_error);
}

void ErrorsFromOutputs(const MatrixF& outputs, const VectorF& mass, const MatrixF& true_outputs,
                       const VectorF& true_mass, float* output_rel_error, float* mass_rel_error) {
  const double ref_norm = true_outputs.cast<double>().norm();
  *output_rel_error = static_cast<float>((outputs - true_outputs).cast<double>().norm() /
                                         std::max(ref_norm, 1e-300));
  *mass_rel_error =
      static_cast<float>(((mass - true_mass).cwiseAbs().array() / true_mass.array()).mean());
}

absl::StatusOr<CompactedHead> CompactHead(const BlockView& block, const MatrixF* queries,
                                          const HeadOptions& options, StageSeconds* seconds) {
  const bool has_queries = queries != nullptr && queries->rows() > 0;
  absl::StatusOr<CompactionPlan> plan = PlanHeads({options}, block.tokens(), has_queries);
  if (!plan.ok()) return plan.status();
  CpuLayerSteps steps({HeadInput{block, has_queries ? queries : nullptr}}, /*pool=*/nullptr);
  absl::StatusOr<LayerResult> result = RunLayerPipeline(*plan, steps, /*pool=*/nullptr, /*cancelled=*/{});
  if (!result.ok()) return result.status();
  *seconds += result->seconds;
  return std::move(result->heads[0]);
}

}  // namespace kvcompact
