// The mass fit's bounded NNLS under iteration caps, across n_fit / t: how many iterations the
// projected Newton method takes to converge, and how much of the objective and of the held-out
// output error an early stop gives up, for it and for the accelerated solver. The basis for
// kMassFitMaxIterations and kMassFitAcceleratedMaxIterations.
//   bench_lsq_caps [--heads=8] [--tokens=4096] [--budget=400] [--eval=256] [--caps=5,10,12]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "core/attention.h"
#include "core/compact_head.h"
#include "core/fit.h"
#include "core/layer.h"
#include "core/method.h"
#include "core/selection.h"
#include "core/synthetic.h"

ABSL_FLAG(int, heads, 8, "heads (independent problems) per point");
ABSL_FLAG(int, tokens, 4096, "T");
ABSL_FLAG(int, budget, 400, "t");
ABSL_FLAG(int, eval, 256, "held-out queries per head");
ABSL_FLAG(std::vector<std::string>, caps, std::vector<std::string>({"5", "10", "12", "15", "20", "30"}),
          "iteration caps to compare with 200 iterations");
ABSL_FLAG(std::vector<std::string>, accelerated, std::vector<std::string>({"50", "100", "200"}),
          "iteration caps of the accelerated solver (core SolveBoundedLsqAccelerated), against the same reference");
ABSL_FLAG(double, accelerated_tolerance, kvcompact::AcceleratedLsqOptions().tolerance,
          "the accelerated solver's tolerance (iterations it took in parentheses)");
ABSL_FLAG(int, power_iterations, kvcompact::AcceleratedLsqOptions().power_iterations,
          "the accelerated solver's power-iteration steps for its step size");
ABSL_FLAG(std::vector<std::string>, n_over_t, std::vector<std::string>({"0.25", "0.5", "1", "1.25", "2", "8"}),
          "fitting queries per point, as multiples of t");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace kvcompact;
  const int heads = absl::GetFlag(FLAGS_heads), T = absl::GetFlag(FLAGS_tokens), t = absl::GetFlag(FLAGS_budget),
            n_eval = absl::GetFlag(FLAGS_eval);
  std::vector<int> caps;
  for (const std::string& c : absl::GetFlag(FLAGS_caps)) caps.push_back(std::stoi(c));
  std::vector<int> fo_its;
  for (const std::string& c : absl::GetFlag(FLAGS_accelerated)) fo_its.push_back(std::stoi(c));
  caps.erase(std::remove(caps.begin(), caps.end(), 200), caps.end());
  caps.push_back(200);  // the reference every gap is measured against, last and once
  std::vector<double> n_over_t;
  for (const std::string& r : absl::GetFlag(FLAGS_n_over_t)) n_over_t.push_back(std::stod(r));
  printf("bench_lsq_caps: T=%d t=%d, %d heads per point; held-out output error at each iteration cap "
         "(relative objective gap to the 200-iteration result in brackets)\n", T, t, heads);
  printf("%-8s | %-18s", "n/t", "iterations max/med");
  for (int c : caps) printf(" | cap %-15d", c);
  printf("\n");
  const MethodSpec& spec = GetMethodSpec(Method::kAmHighestAttention);
  HeadOptions options;
  const auto [lo, hi] = WeightBounds(options, spec);
  for (double ratio : n_over_t) {
    const int n_fit = static_cast<int>(ratio * t);
    std::vector<int> iters;
    std::vector<double> err(caps.size()), gap(caps.size());
    std::vector<double> fo_err(fo_its.size()), fo_gap(fo_its.size());
    std::vector<int> fo_used(fo_its.size());  // most iterations any head took
    for (int h = 0; h < heads; ++h) {
      SyntheticShape shape;
      shape.heads = 1;
      shape.tokens = T;
      shape.queries = n_fit + n_eval;
      const LayerData d = MakeSyntheticLayer(shape, 100 + h);
      const BlockView block = d.HeadBlock(0);
      const MatrixF all_q = d.HeadQueries(0);
      const MatrixF fit_q = all_q.topRows(n_fit), eval_q = all_q.bottomRows(n_eval);
      const AttentionStats fit_stats = ComputeAttentionStats(block, fit_q, spec.default_score, 256);
      const AttentionStats eval_stats = ComputeAttentionStats(block, eval_q, std::nullopt, 256);
      CompactedHead head;
      head.indices = SelectKeys(spec.selection, block.tokens(), fit_stats.scores, SelectionParamsFor(options, spec, t));
      head.keys = GatherRows(block.keys, head.indices);
      const VectorF bias = VectorF::Zero(t);
      const MatrixF logits = SubsetLogits(fit_q, head.keys, bias, block.scale);
      const double prior = MassPrior(options, t, DistinctQueryCount(fit_q));
      const double ridge = ValueRidge(options, t, DistinctQueryCount(fit_q));
      const MatrixF selected = GatherRows(block.values, head.indices);
      const auto [gram, rhs] = BuildMassSystem(logits, fit_stats.row_max, fit_stats.mass, prior);
      const BoundedLsqResult full = SolveBoundedLsq(gram, rhs, lo, hi);
      iters.push_back(full.iterations);
      const double f_full = 0.5 * full.w.dot(gram * full.w) - rhs.dot(full.w);
      for (size_t k = 0; k < caps.size(); ++k) {
        BoundedLsqOptions o;
        o.max_iterations = caps[k];
        const BoundedLsqResult r = SolveBoundedLsq(gram, rhs, lo, hi, o);
        const double f = 0.5 * r.w.dot(gram * r.w) - rhs.dot(r.w);
        gap[k] += (f - f_full) / std::max(1e-300, std::abs(f_full)) / heads;
        head.beta = (r.w.array().log().cast<float>() + bias.array()).matrix();
        const MatrixF design = RowSoftmax(SubsetLogits(fit_q, head.keys, head.beta, block.scale));
        head.values = FitValues(design, fit_stats.outputs, ridge, &selected);
        float out_err = 0, mass_err = 0;
        MeasureErrors(head, eval_q, eval_stats, block.scale, &out_err, &mass_err);
        err[k] += out_err / heads;
      }
      for (size_t k = 0; k < fo_its.size(); ++k) {
        AcceleratedLsqOptions o;
        o.max_iterations = fo_its[k];
        o.tolerance = absl::GetFlag(FLAGS_accelerated_tolerance);
        o.power_iterations = absl::GetFlag(FLAGS_power_iterations);
        const BoundedLsqResult solved = SolveBoundedLsqAccelerated(gram, rhs, lo, hi, o);
        fo_used[k] = std::max(fo_used[k], solved.iterations);
        const VectorD& w = solved.w;
        const double f = 0.5 * w.dot(gram * w) - rhs.dot(w);
        fo_gap[k] += (f - f_full) / std::max(1e-300, std::abs(f_full)) / heads;
        head.beta = (w.array().log().cast<float>() + bias.array()).matrix();
        const MatrixF design = RowSoftmax(SubsetLogits(fit_q, head.keys, head.beta, block.scale));
        head.values = FitValues(design, fit_stats.outputs, ridge, &selected);
        float out_err = 0, mass_err = 0;
        MeasureErrors(head, eval_q, eval_stats, block.scale, &out_err, &mass_err);
        fo_err[k] += out_err / heads;
      }
    }
    std::sort(iters.begin(), iters.end());
    printf("%-8.2f | %4d / %-11d", ratio, iters.back(), iters[iters.size() / 2]);
    for (size_t k = 0; k < caps.size(); ++k) printf(" | %.4f [%7.1e]", err[k], gap[k]);
    printf("\n");
    printf("%-8s | %-18s", "", "accelerated solver");
    for (size_t k = 0; k < fo_its.size(); ++k) printf(" | %4d its (%d) %.4f [%7.1e]", fo_its[k], fo_used[k], fo_err[k], fo_gap[k]);
    printf("\n");
    fflush(stdout);
  }
  return 0;
}
