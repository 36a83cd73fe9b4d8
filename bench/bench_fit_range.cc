// The AM fit across the range of query counts, against plain selection of the same keys: held-out
// output error (independent queries) per head for n_fit from far below t to far above it, and for
// near-duplicate fitting queries, with and without the priors toward selection
// (HeadOptions::mass_prior, ridge; scaled by DistinctQueryCount) and with the service's choice
// of the better of fit and selection on held-out queries. Mean and standard error over heads; a
// fit that loses to selection on held-out queries shows here. (The guard column picks on the
// same queries it reports, as the service does: its figure is optimistic by that choice.)
//   bench_fit_range [--heads=16] [--tokens=2048] [--budget=128] [--eval=256]
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "core/compact_head.h"
#include "core/fit.h"
#include "core/layer.h"
#include "core/selection.h"
#include "core/synthetic.h"

ABSL_FLAG(int, heads, 16, "heads (independent problems) per point");
ABSL_FLAG(int, tokens, 2048, "T");
ABSL_FLAG(int, budget, 128, "t");
ABSL_FLAG(int, eval, 256, "held-out queries per head");

namespace kvcompact {
namespace {

struct Variant {
  std::string name;
  bool fit;
  double mass_prior, ridge;
  bool values_at_selection;
  bool adaptive = false;  // both priors scaled by min(1, 2t / n): the data dominate as n grows
  bool service = false;   // the service's defaults (HeadOptions 0: ValueRidge, MassPrior)
  bool guard = false;     // and its choice of the better of fit and selection on held-out queries
};

// Held-out output error of `variant` for one head: keys chosen by highest attention on fit_q.
double HeldOutError(const BlockView& block, const MatrixF& fit_q, const MatrixF& eval_q, int64_t t, const Variant& v) {
  const MethodSpec& spec = GetMethodSpec(Method::kAmHighestAttention);
  HeadOptions options;
  const AttentionStats fit_stats = ComputeAttentionStats(block, fit_q, spec.default_score, 256);
  const AttentionStats eval_stats = ComputeAttentionStats(block, eval_q, std::nullopt, 256);
  CompactedHead head;
  head.indices = SelectKeys(spec.selection, block.tokens(), fit_stats.scores, SelectionParamsFor(options, spec, t));
  head.keys = GatherRows(block.keys, head.indices);
  const VectorF bias = VectorF::Zero(t);
  const double scale = v.adaptive ? std::min(1.0, 2.0 * t / static_cast<double>(fit_q.rows())) : 1.0;
  double mass_prior = v.mass_prior * scale, ridge = v.ridge * (v.values_at_selection ? scale : 1.0);
  if (v.service) {
    mass_prior = MassPrior(options, t, DistinctQueryCount(fit_q));
    ridge = ValueRidge(options, t, DistinctQueryCount(fit_q));
  }
  if (v.fit) {
    const MatrixF logits = SubsetLogits(fit_q, head.keys, bias, block.scale);
    const auto [lo, hi] = WeightBounds(options, spec);
    head.beta = FitMass(logits, fit_stats.row_max, fit_stats.mass, bias, lo, hi, mass_prior).beta;
    const MatrixF design = RowSoftmax(SubsetLogits(fit_q, head.keys, head.beta, block.scale));
    const MatrixF selected = GatherRows(block.values, head.indices);
    head.values = FitValues(design, fit_stats.outputs, ridge, v.values_at_selection ? &selected : nullptr);
  } else {
    head.beta = bias;
    head.values = GatherRows(block.values, head.indices);
  }
  float out_err = 0, mass_err = 0;
  MeasureErrors(head, eval_q, eval_stats, block.scale, &out_err, &mass_err);
  if (v.guard) {  // the service keeps plain selection where it does better on the held-out queries
    CompactedHead selection = head;
    selection.beta = bias;
    selection.values = GatherRows(block.values, head.indices);
    float sel_err = 0;
    MeasureErrors(selection, eval_q, eval_stats, block.scale, &sel_err, &mass_err);
    out_err = std::min(out_err, sel_err);
  }
  return out_err;
}

}  // namespace
}  // namespace kvcompact

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace kvcompact;
  const int heads = absl::GetFlag(FLAGS_heads), T = absl::GetFlag(FLAGS_tokens), t = absl::GetFlag(FLAGS_budget),
            n_eval = absl::GetFlag(FLAGS_eval);
  const std::vector<Variant> variants = {
      {"selection", false, 0, 0, false},
      {"fit, no priors (ridge 1e-5 at 0)", true, 0, 1e-5, false},
      {"priors x min(1, 2t/n)", true, 1e-3, 1e-2, true, true},
      {"service priors", true, 0, 0, true, false, true},
      {"service (priors + guard)", true, 0, 0, true, false, true, true},
  };
  struct Point { std::string name; int n_fit; int distinct; };  // distinct > 0: near-duplicate queries
  const std::vector<Point> points = {{"n=t/4", t / 4, 0}, {"n=t/2", t / 2, 0}, {"n=t", t, 0}, {"n=1.25t", t * 5 / 4, 0},
                                     {"n=2t", 2 * t, 0}, {"n=4t", 4 * t, 0}, {"n=16t", 16 * t, 0},
                                     {"4t of 8 distinct", 4 * t, 8}, {"4t of t/2 distinct", 4 * t, t / 2}};
  printf("bench_fit_range: T=%d t=%d, %d heads per point, %d held-out queries each; mean held-out output error (s.e.)\n",
         T, t, heads, n_eval);
  printf("%-20s", "fitting queries");
  for (const Variant& v : variants) printf(" | %-22.22s", v.name.c_str());
  printf("\n");
  for (const Point& p : points) {
    std::vector<std::vector<double>> errs(variants.size());
    for (int h = 0; h < heads; ++h) {
      SyntheticShape shape;
      shape.heads = 1;
      shape.tokens = T;
      shape.queries = p.n_fit + n_eval;
      const LayerData d = MakeSyntheticLayer(shape, 100 + h);
      const MatrixF all_q = d.HeadQueries(0);
      MatrixF fit_q = all_q.topRows(p.n_fit);
      const MatrixF eval_q = all_q.bottomRows(n_eval);
      if (p.distinct > 0) {  // p.distinct queries, each repeated with a little noise
        std::mt19937 rng(h);
        std::normal_distribution<float> noise(0.f, 1e-3f);
        for (int i = 0; i < p.n_fit; ++i) {
          for (int c = 0; c < fit_q.cols(); ++c) fit_q(i, c) = all_q(i % p.distinct, c) + noise(rng);
        }
      }
      for (size_t k = 0; k < variants.size(); ++k) errs[k].push_back(HeldOutError(d.HeadBlock(0), fit_q, eval_q, t, variants[k]));
    }
    printf("%-20s", p.name.c_str());
    for (const auto& e : errs) {
      double mean = 0, var = 0;
      for (double x : e) mean += x / e.size();
      for (double x : e) var += (x - mean) * (x - mean) / (e.size() - 1);
      printf(" | %8.4f (%7.4f)      ", mean, std::sqrt(var / e.size()));
    }
    printf("\n");
    fflush(stdout);
  }
  return 0;
}
