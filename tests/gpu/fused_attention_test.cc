// The fused attention-statistics kernels (16-bit tensor cores) against float64 arithmetic on random
// bf16 and fp16 inputs across shapes (one query or key, tile edges 63/64/65, many tiles), head
// sizes, biases, reductions and spreads of the logits; and the CUDA backend with them against the
// CPU backend and its unfused path. Label: gpu.
#include <cmath>
#include <cstdio>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/dtype.h"
#include "core/layer.h"
#include "core/synthetic.h"
#include "kernels/fused_attention.cuh"
#include "tests/gpu/gpu_test_util.h"

namespace kvcompact {
namespace {

using kernels::ScoreReduceKind;

struct Shape {
  DType dtype;
  int64_t n, T, d, dv;
  bool bias;
  std::optional<ScoreReduceKind> reduce;
  float logit_std;  // scale * sqrt(d): the spread of the logits
};

struct Reference {
  std::vector<double> row_max, mass, outputs, scores;
};

Reference Float64Stats(const Shape& s, int64_t heads, float scale, const std::vector<float>& q, const std::vector<float>& k,
                       const std::vector<float>& v, const std::vector<float>& b) {
  Reference r;
  r.row_max.resize(heads * s.n);
  r.mass.resize(heads * s.n);
  r.outputs.assign(heads * s.n * s.dv, 0.0);
  r.scores.assign(heads * s.T, 0.0);
  std::vector<double> logits(s.T);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < s.n; ++i) {
      const float* qi = &q[(h * s.n + i) * s.d];
      double mx = -INFINITY;
      for (int64_t j = 0; j < s.T; ++j) {
        const float* kj = &k[(h * s.T + j) * s.d];
        double dot = 0;
        for (int64_t c = 0; c < s.d; ++c) dot += double(qi[c]) * kj[c];
        logits[j] = scale * dot + (s.bias ? b[h * s.T + j] : 0.0);
        mx = std::max(mx, logits[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < s.T; ++j) sum += std::exp(logits[j] - mx);
      r.row_max[h * s.n + i] = mx;
      r.mass[h * s.n + i] = sum;
      for (int64_t j = 0; j < s.T; ++j) {
        const double p = std::exp(logits[j] - mx) / sum;
        for (int64_t c = 0; c < s.dv; ++c) r.outputs[(h * s.n + i) * s.dv + c] += p * v[(h * s.T + j) * s.dv + c];
        double& score = r.scores[h * s.T + j];
        if (s.reduce == ScoreReduceKind::kMax) score = std::max(score, p);
        if (s.reduce == ScoreReduceKind::kRms) score += p * p;
        if (s.reduce == ScoreReduceKind::kMean) score += p;
      }
    }
    for (int64_t j = 0; j < s.T; ++j) {
      double& score = r.scores[h * s.T + j];
      if (s.reduce == ScoreReduceKind::kRms) score = std::sqrt(score / s.n);
      if (s.reduce == ScoreReduceKind::kMean) score /= s.n;
    }
  }
  return r;
}

double RelErr64(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

std::string Name(const Shape& s) {
  return std::string(DTypeName(s.dtype)) + " n=" + std::to_string(s.n) + " T=" + std::to_string(s.T) + " d=" + std::to_string(s.d) + " dv=" +
         std::to_string(s.dv) + (s.bias ? " bias" : "") + " reduce=" + std::to_string(s.reduce ? int(*s.reduce) : 0) +
         " logit_std=" + std::to_string(s.logit_std);
}

TEST(FusedAttention, MatchesFloat64AcrossShapes) {
  SKIP_WITHOUT_GPU();
  if (!kernels::FusedStatsSupported(DType::kBFloat16, 128, 128)) GTEST_SKIP() << "no 16-bit tensor cores on this device";
  const auto rms = ScoreReduceKind::kRms, mean = ScoreReduceKind::kMean, max = ScoreReduceKind::kMax;
  const DType bf16 = DType::kBFloat16, fp16 = DType::kFloat16;
  const std::vector<Shape> shapes = {
      {bf16, 1, 1, 64, 64, false, rms, 2},       {fp16, 1, 5, 128, 128, true, max, 2},
      {bf16, 15, 31, 128, 128, true, mean, 2},   {fp16, 64, 32, 64, 128, true, max, 2},
      {bf16, 65, 33, 128, 64, false, rms, 2},    {bf16, 63, 64, 64, 64, true, rms, 2},
      {fp16, 130, 257, 128, 128, true, rms, 2},  {bf16, 200, 3000, 64, 64, true, max, 2},
      {bf16, 77, 1000, 128, 128, false, {}, 2},  {fp16, 64, 4097, 128, 128, true, mean, 2},
      {bf16, 50, 700, 64, 64, true, rms, 8},     {bf16, 33, 2000, 128, 128, true, max, 12},
      {fp16, 300, 65, 128, 128, false, rms, 0.5f}, {bf16, 129, 129, 128, 128, true, rms, 2},
  };
  const int64_t heads = 3;
  std::mt19937 rng(11);
  std::normal_distribution<float> g(0, 1);
  for (const Shape& s : shapes) {
    SCOPED_TRACE(Name(s));
    const float scale = s.logit_std / std::sqrt(float(s.d));
    std::vector<float> q(heads * s.n * s.d), k(heads * s.T * s.d), v(heads * s.T * s.dv), b(heads * s.T);
    for (auto* x : {&q, &k, &v, &b}) {
      for (float& e : *x) e = g(rng);
    }
    for (auto* x : {&q, &k, &v}) RoundThrough(*x, s.dtype);
    Guarded dq(q), dk(k), dv(v), db(b), dmax(std::vector<float>(heads * s.n)), dmass(std::vector<float>(heads * s.n)),
        dout(std::vector<float>(heads * s.n * s.dv)), dscores(std::vector<float>(heads * s.T, -1.f)),
        dwork(std::vector<float>(kernels::FusedStatsWorkspaceBytes(heads, s.n, s.T, s.d, s.dv) / sizeof(float)));
    ASSERT_TRUE(kernels::FusedAttentionStats(s.dtype, dq.data(), s.n, dk.data(), dv.data(), s.bias ? db.data() : nullptr, heads, s.T,
                                             s.d, s.dv, scale, dmax.data(), dmass.data(), dout.data(), s.reduce,
                                             dscores.data(), dwork.data(), nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    bool ok[4];
    const auto row_max = dmax.Read(&ok[0]);
    const auto mass = dmass.Read(&ok[1]);
    const auto outputs = dout.Read(&ok[2]);
    const auto scores = dscores.Read(&ok[3]);
    for (int i = 0; i < 4; ++i) EXPECT_TRUE(ok[i]) << "guard values overwritten, output " << i;
    bool work_ok = false;
    dwork.Read(&work_ok);
    EXPECT_TRUE(work_ok) << "written past the workspace";
    const Reference want = Float64Stats(s, heads, scale, q, k, v, b);
    // The logits are exact products summed in fp32; only P V rounds the probabilities to the
    // dtype (8 bits of mantissa in bf16, 11 in fp16).
    const double exact_tol = 2e-5 * std::max(1.f, s.logit_std);
    const double p_tol = s.dtype == bf16 ? 4e-3 : 5e-4;
    double worst_max = 0;
    for (size_t i = 0; i < row_max.size(); ++i) worst_max = std::max(worst_max, std::abs(row_max[i] - want.row_max[i]));
    const double mass_err = RelErr64(mass, want.mass), out_err = RelErr64(outputs, want.outputs);
    const double score_err = s.reduce ? RelErr64(scores, want.scores) : 0;
    printf("%-48s row max %.1e  mass %.1e  outputs %.1e  scores %.1e\n", Name(s).c_str(), worst_max, mass_err, out_err,
           score_err);
    EXPECT_LT(worst_max, exact_tol) << "row max";
    EXPECT_LT(mass_err, exact_tol) << "mass";
    EXPECT_LT(out_err, p_tol) << "outputs";
    if (s.reduce) {
      EXPECT_LT(score_err, exact_tol) << "scores";
    } else {
      for (float x : scores) ASSERT_EQ(x, -1.f) << "scores written without a reduction";
    }
  }
}

TEST(FusedAttention, DeclinesWhatItDoesNotServe) {
  SKIP_WITHOUT_GPU();
  EXPECT_FALSE(kernels::FusedStatsSupported(DType::kBFloat16, 96, 128));
  EXPECT_FALSE(kernels::FusedStatsSupported(DType::kFloat16, 128, 256));
  EXPECT_FALSE(kernels::FusedStatsSupported(DType::kFloat32, 128, 128));
  Guarded buf(std::vector<float>(4096, 0.f));
  float* p = buf.data();
  // fp32 inputs, a head size it does not serve, a misaligned workspace or output, no queries:
  // nothing launched.
  const DType bf16 = DType::kBFloat16;
  EXPECT_FALSE(kernels::FusedAttentionStats(DType::kFloat32, p, 4, p, p, nullptr, 1, 4, 64, 64, 1.f, p, p, p, std::nullopt, p, p, nullptr));
  EXPECT_FALSE(kernels::FusedAttentionStats(bf16, p, 4, p, p, nullptr, 1, 4, 96, 96, 1.f, p, p, p, std::nullopt, p, p, nullptr));
  EXPECT_FALSE(kernels::FusedAttentionStats(bf16, p, 4, p, p, nullptr, 1, 4, 64, 64, 1.f, p, p, p, std::nullopt, p, p + 1, nullptr));
  EXPECT_FALSE(kernels::FusedAttentionStats(bf16, p, 4, p, p, nullptr, 1, 4, 64, 64, 1.f, p, p, p + 2, std::nullopt, p, p, nullptr));
  EXPECT_FALSE(kernels::FusedAttentionStats(bf16, p, 0, p, p, nullptr, 1, 4, 64, 64, 1.f, p, p, p, std::nullopt, p, p, nullptr));
  bool intact = false;
  const auto after = buf.Read(&intact);
  EXPECT_TRUE(intact);
  for (float x : after) ASSERT_EQ(x, 0.f);
}

// With tensor-core math allowed and bf16 or fp16 inputs the backend's statistics come from the
// fused kernels; its results must match the CPU backend's (fp32) and the unfused path's (cuBLAS
// TF32 over logit chunks) up to rounding.
TEST(FusedAttention, BackendMatchesCpuAndUnfused) {
  SKIP_WITHOUT_GPU();
  if (!kernels::FusedStatsSupported(DType::kBFloat16, 128, 128)) GTEST_SKIP() << "no 16-bit tensor cores on this device";
  kernels::CudaBackendOptions fused_options, unfused_options;
  fused_options.allow_tf32 = unfused_options.allow_tf32 = true;
  unfused_options.fused_stats = false;
  auto fused = kernels::MakeCudaBackend(fused_options);
  auto unfused = kernels::MakeCudaBackend(unfused_options);
  ASSERT_TRUE(fused.ok() && unfused.ok());
  auto cpu = MakeCpuBackend(4);
  uint64_t seed = 500;
  for (int64_t T : {300, 2000, 5000}) {
    for (int64_t d : {64, 128}) {
      SyntheticShape shape;
      shape.heads = 4;
      shape.tokens = T;
      shape.queries = 700;
      shape.head_dim = shape.value_dim = d;
      LayerJob job;
      job.data = MakeSyntheticLayer(shape, ++seed, 2);
      job.data.inputs_dtype = d == 64 ? DType::kFloat16 : DType::kBFloat16;
      for (auto* x : {&job.data.keys, &job.data.values, &job.data.query_data}) RoundThrough(*x, job.data.inputs_dtype);
      if (T == 2000) {
        std::mt19937 rng(seed);
        std::normal_distribution<float> g(0, 0.5f);
        job.data.bias.resize(shape.heads * T);
        for (float& x : job.data.bias) x = g(rng);
      }
      job.options.method = Method::kAmHighestAttention;
      job.options.holdout_fraction = 0.1f;
      job.options.seed = seed;
      for (int64_t h = 0; h < shape.heads; ++h) job.budgets.push_back(T / 10 + h * 7);
      const std::string where = "T=" + std::to_string(T) + " d=" + std::to_string(d);
      auto a = (*fused)->CompactLayer(job);
      auto u = (*unfused)->CompactLayer(job);
      auto c = cpu->CompactLayer(job);
      ASSERT_TRUE(a.ok() && u.ok() && c.ok()) << where;
      for (size_t h = 0; h < c->heads.size(); ++h) {
        const CompactedHead &f = a->heads[h], &x = u->heads[h], &r = c->heads[h];
        ASSERT_EQ(f.indices.size(), r.indices.size()) << where;
        size_t same_cpu = 0, same_unfused = 0;
        for (int64_t i : r.indices) same_cpu += std::binary_search(f.indices.begin(), f.indices.end(), i);
        for (int64_t i : x.indices) same_unfused += std::binary_search(f.indices.begin(), f.indices.end(), i);
        // TF32 scores reorder near-ties at the budget's edge; the kept sets stay nearly the same.
        EXPECT_GE(same_cpu, r.indices.size() * 95 / 100) << where << " head " << h;
        EXPECT_GE(same_unfused, x.indices.size() * 98 / 100) << where << " head " << h;
        EXPECT_TRUE(f.beta.allFinite() && f.values.allFinite()) << where;
        EXPECT_NEAR(f.quality.output_rel_error, r.quality.output_rel_error, 3e-3f + 0.03f * r.quality.output_rel_error)
            << where << " head " << h;
        EXPECT_NEAR(f.quality.output_rel_error, x.quality.output_rel_error, 2e-3f + 0.02f * x.quality.output_rel_error)
            << where << " head " << h;
      }
    }
  }
}

}  // namespace
}  // namespace kvcompact
