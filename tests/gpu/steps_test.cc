// Every step of the pipeline (core/pipeline.h) on the CUDA backend against the CPU's, on the same
// inputs, with a tolerance per step and configuration (ggml's test-backend-ops is the model). A
// tee runs each step on both backends from the CPU's state (the same selection, the same beta into
// the value fit), so a difference is charged to the step that made it, not to one before it.
// Label: gpu.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "core/cpu_steps.h"
#include "core/dtype.h"
#include "core/synthetic.h"
#include "kernels/cuda_backend.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvcompact {
namespace {

struct Tolerances {
  double scores;         // relative L2 error of each head's key scores
  double composite_scores;  // the same for RMS_MAX, COVERAGE, RMS_COVERAGE
  double omp_overlap;    // share of OMP's kept keys the two agree on
  float beta;            // largest |beta difference| of a fitted head
  double values;         // relative L2 error of a fitted head's C_v
  float figures;         // error figures (held-out, fit, mass): |difference| <= figures + figures_rel * |CPU's|
  float figures_rel;
};

// The worst difference seen per step, printed as a table at the end of each configuration.
struct Worst {
  double scores = 0, composite_scores = 0, omp_overlap = 1, beta = 0, values = 0, figures = 0;
};

class TeeSteps final : public LayerSteps {
 public:
  TeeSteps(LayerSteps& reference, LayerSteps& device, const Tolerances& tol, std::string where)
      : ref_(reference), dev_(device), tol_(tol), where_(std::move(where)) {}

  BlockView Block(int64_t head) const override { return ref_.Block(head); }
  bool ComputesScore(ScoreReduce r) const override { return ref_.ComputesScore(r) && dev_.ComputesScore(r); }

  absl::Status Statistics(const CompactionPlan& plan, MatrixF* scores, StageSeconds* seconds) override {
    MatrixF dev_scores;
    StageSeconds unused;
    if (auto s = ref_.Statistics(plan, scores, seconds); !s.ok()) return s;
    if (auto s = dev_.Statistics(plan, &dev_scores, &unused); !s.ok()) return s;
    if (!plan.reduce) return absl::OkStatus();
    EXPECT_EQ(dev_scores.rows(), scores->rows()) << where_;
    EXPECT_EQ(dev_scores.cols(), scores->cols()) << where_;
    for (size_t h = 0; h < plan.heads.size() && dev_scores.rows() == scores->rows(); ++h) {
      if (plan.heads[h].unchanged) continue;
      const VectorF want = scores->row(h).transpose(), got = dev_scores.row(h).transpose();
      const double err = RelErr(got.data(), want.data(), want.size());
      // A composite score moves by a whole count or rank where two keys are within rounding.
      const bool composite = IsCompositeScore(*plan.reduce);
      (composite ? worst.composite_scores : worst.scores) = std::max(composite ? worst.composite_scores : worst.scores, err);
      EXPECT_LT(err, composite ? tol_.composite_scores : tol_.scores) << where_ << " head " << h << ": scores";
    }
    return absl::OkStatus();
  }

  absl::Status SelectOmp(const CompactionPlan& plan, const std::vector<int64_t>& heads, const MatrixF& scores,
                         std::vector<std::vector<int32_t>>* kept) override {
    std::vector<std::vector<int32_t>> dev_kept(kept->size());
    if (auto s = ref_.SelectOmp(plan, heads, scores, kept); !s.ok()) return s;
    if (auto s = dev_.SelectOmp(plan, heads, scores, &dev_kept); !s.ok()) return s;
    for (int64_t h : heads) {
      const auto& want = (*kept)[h];
      const auto& got = dev_kept[h];
      EXPECT_EQ(got.size(), want.size()) << where_ << " head " << h;
      size_t same = 0;
      for (int32_t j : want) same += std::binary_search(got.begin(), got.end(), j);
      const double overlap = want.empty() ? 1.0 : static_cast<double>(same) / want.size();
      worst.omp_overlap = std::min(worst.omp_overlap, overlap);
      EXPECT_GE(overlap, tol_.omp_overlap) << where_ << " head " << h << ": OMP's kept keys";
    }
    return absl::OkStatus();
  }

  absl::Status FitMass(const CompactionPlan& plan, std::vector<CompactedHead>* heads, StageSeconds* seconds) override {
    std::vector<CompactedHead> dev_heads = *heads;
    StageSeconds unused;
    if (auto s = ref_.FitMass(plan, heads, seconds); !s.ok()) return s;
    if (auto s = dev_.FitMass(plan, &dev_heads, &unused); !s.ok()) return s;
    for (int64_t h : plan.FittedHeads()) {
      const VectorF& want = (*heads)[h].beta;
      const VectorF& got = dev_heads[h].beta;
      EXPECT_TRUE(got.allFinite()) << where_ << " head " << h;
      const float diff = got.size() == want.size() ? (got - want).cwiseAbs().maxCoeff() : INFINITY;
      worst.beta = std::max<double>(worst.beta, diff);
      EXPECT_LE(diff, tol_.beta) << where_ << " head " << h << ": beta";
    }
    return absl::OkStatus();
  }

  absl::Status FitValuesAndEvaluate(const CompactionPlan& plan, const std::vector<CompactedHead>& selection,
                                    std::vector<CompactedHead>* heads, std::vector<HeadFigures>* figures,
                                    StageSeconds* seconds) override {
    std::vector<CompactedHead> dev_heads = *heads;
    std::vector<HeadFigures> dev_figures(figures->size());
    StageSeconds unused;
    if (auto s = ref_.FitValuesAndEvaluate(plan, selection, heads, figures, seconds); !s.ok()) return s;
    if (auto s = dev_.FitValuesAndEvaluate(plan, selection, &dev_heads, &dev_figures, &unused); !s.ok()) return s;
    for (size_t h = 0; h < plan.heads.size(); ++h) {
      const std::string at = where_ + " head " + std::to_string(h);
      if (plan.heads[h].fit) {
        const MatrixF& want = (*heads)[h].values;
        const MatrixF& got = dev_heads[h].values;
        EXPECT_EQ(got.size(), want.size()) << at;
        if (got.size() != want.size()) continue;
        const double err = RelErr(got.data(), want.data(), want.size());
        worst.values = std::max(worst.values, err);
        EXPECT_LT(err, tol_.values) << at << ": C_v";
      }
      const HeadFigures &w = (*figures)[h], &g = dev_figures[h];
      EXPECT_EQ(g.fitted.eval_queries, w.fitted.eval_queries) << at;
      EXPECT_EQ(g.selection.has_value(), w.selection.has_value()) << at;
      const auto near = [&](float a, float b) { return std::abs(a - b) <= tol_.figures + tol_.figures_rel * std::abs(b); };
      auto check = [&](const HeadQuality& got, const HeadQuality& want, const char* what) {
        for (auto [a, b] : {std::pair{got.output_rel_error, want.output_rel_error},
                            {got.fit_output_rel_error, want.fit_output_rel_error},
                            {got.mass_rel_error, want.mass_rel_error}}) {
          worst.figures = std::max<double>(worst.figures, std::abs(a - b));
          EXPECT_TRUE(near(a, b)) << at << " " << what << ": " << a << " against " << b;
        }
      };
      check(g.fitted, w.fitted, "fitted");
      // Plain selection's fit error is measured by the CPU only where selection wins.
      if (g.selection && w.selection) {
        worst.figures = std::max<double>(worst.figures, std::abs(g.selection->output_rel_error - w.selection->output_rel_error));
        EXPECT_TRUE(near(g.selection->output_rel_error, w.selection->output_rel_error)) << at << " selection";
      }
    }
    return absl::OkStatus();
  }

  Worst worst;

 private:
  LayerSteps& ref_;
  LayerSteps& dev_;
  Tolerances tol_;
  std::string where_;
};

struct Config {
  const char* name;
  DType dtype;          // the inputs' dtype (the wire's)
  bool tensor_cores;    // allow_tf32: TF32 products, the fused statistics for 16-bit inputs
  Tolerances tol;
};

LayerJob MakeJob(int64_t T, int64_t d, Method method, DType dtype, bool bias, uint64_t seed) {
  SyntheticShape shape;
  shape.heads = 4;
  shape.tokens = T;
  shape.queries = 600;
  shape.head_dim = shape.value_dim = d;
  LayerJob job;
  job.data = MakeSyntheticLayer(shape, seed, 1);
  job.data.inputs_dtype = dtype;
  for (auto* x : {&job.data.keys, &job.data.values, &job.data.query_data}) RoundThrough(*x, dtype);
  if (bias) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> g(0, 0.5f);
    job.data.bias.resize(shape.heads * T);
    for (float& x : job.data.bias) x = g(rng);
  }
  job.options.method = method;
  job.options.seed = seed;
  job.options.holdout_fraction = 0.1;
  job.options.mass_fit_solver = MassFitSolver::kAccelerated;  // the same algorithm on both
  // Ragged budgets, one head kept whole (budget over T: no scores, no fit, still evaluated).
  job.budgets = {T / 20, T / 8, T / 5 + 3, T + 1};
  return job;
}

TEST(PipelineSteps, EveryStepMatchesTheCpuOnRandomInputs) {
  SKIP_WITHOUT_GPU();
  const Config configs[] = {
      // The whole-result tests' bounds (cuda_backend_test.cc, fused_attention_test.cc) where they
      // exist; the others from the sizes of the fp32 and TF32 roundings.
      {"fp32", DType::kFloat32, false, {1e-4, 5e-2, 0.90, 2e-3f, 2e-3, 2e-3f, 0.02f}},
      {"bf16, tensor cores", DType::kBFloat16, true, {2e-3, 0.15, 0.90, 2e-2f, 2e-2, 3e-3f, 0.03f}},
      {"fp16, tensor cores", DType::kFloat16, true, {2e-3, 0.15, 0.90, 2e-2f, 2e-2, 3e-3f, 0.03f}},
  };
  uint64_t seed = 900;
  for (const Config& config : configs) {
    kernels::CudaBackendOptions options;
    options.allow_tf32 = config.tensor_cores;
    auto gpu = kernels::MakeCudaBackend(options);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    Worst worst;
    for (int64_t T : {500, 3000}) {
      for (int64_t d : {64, 128}) {
        // The method's own score, and for highest attention the composite ones (the unfused path).
        std::vector<std::pair<Method, std::optional<ScoreReduce>>> runs = {
            {Method::kAmHighestAttention, std::nullopt}, {Method::kH2O, std::nullopt}};
        if (T == 500) runs.push_back({Method::kAmOmpFast, std::nullopt});  // OMP's host loop is slow: one size
        if (d == 64) {
          for (ScoreReduce r : {ScoreReduce::kMax, ScoreReduce::kRmsMax, ScoreReduce::kCoverage, ScoreReduce::kRmsCoverage}) {
            runs.push_back({Method::kAmHighestAttention, r});
          }
        }
        for (const auto& [method, score] : runs) {
          LayerJob job = MakeJob(T, d, method, config.dtype, T == 3000, ++seed);
          job.options.score = score;
          const std::string where = std::string(config.name) + " T=" + std::to_string(T) + " d=" + std::to_string(d) +
                                    " " + std::string(GetMethodSpec(method).name) +
                                    (score ? " score " + std::string(ScoreReduceName(*score)) : "");
          std::vector<MatrixF> queries;
          std::vector<HeadInput> inputs;
          for (int64_t h = 0; h < job.data.heads; ++h) queries.push_back(job.data.HeadQueries(h));
          for (int64_t h = 0; h < job.data.heads; ++h) inputs.push_back({job.data.HeadBlock(h), &queries[h]});
          CpuLayerSteps cpu(std::move(inputs), nullptr);
          TeeSteps tee(cpu, kernels::CudaStepsFor(**gpu, job), config.tol, where);
          absl::StatusOr<CompactionPlan> plan = PlanLayer(job);
          ASSERT_TRUE(plan.ok()) << plan.status();
          absl::StatusOr<LayerResult> result = RunLayerPipeline(*plan, tee, nullptr, {});
          ASSERT_TRUE(result.ok()) << where << ": " << result.status();
          worst.scores = std::max(worst.scores, tee.worst.scores);
          worst.composite_scores = std::max(worst.composite_scores, tee.worst.composite_scores);
          worst.omp_overlap = std::min(worst.omp_overlap, tee.worst.omp_overlap);
          worst.beta = std::max(worst.beta, tee.worst.beta);
          worst.values = std::max(worst.values, tee.worst.values);
          worst.figures = std::max(worst.figures, tee.worst.figures);
        }
      }
    }
    printf("%-20s worst: scores %.1e  composite scores %.1e  OMP overlap %.3f  beta %.1e  C_v %.1e  figures %.1e\n",
           config.name, worst.scores, worst.composite_scores, worst.omp_overlap, worst.beta, worst.values, worst.figures);
  }
}

}  // namespace
}  // namespace kvcompact
