// The CUDA backend against the CPU backend (the reference) on random inputs, and each kernel
// against its CPU counterpart. Math mode: fp32 (cuBLAS pedantic; TF32 off) unless a test says
// otherwise. Skipped when no CUDA device is usable. Label: gpu.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <optional>
#include <random>

#include <gtest/gtest.h>

#include "core/attention.h"
#include "core/dtype.h"
#include "core/omp.h"
#include "core/synthetic.h"
#include "kernels/am_kernels.cuh"
#include "kernels/cuda_backend.h"
#include "kernels/device_omp_gram.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvcompact {
namespace {

// RowSoftmaxStats alone, and SoftmaxWithScores with every reduction, against Eigen: rows that do
// not fill a score tile (17) and several tiles (70), short and long rows, a per-column bias.
TEST(Kernels, RowSoftmaxStatsAndScoresMatchCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(1);
  std::normal_distribution<float> g(0, 2);
  const std::optional<kernels::ScoreReduceKind> kinds[] = {std::nullopt, kernels::ScoreReduceKind::kRms,
                                                           kernels::ScoreReduceKind::kMean, kernels::ScoreReduceKind::kMax};
  for (int64_t rows : {17, 70}) {
    for (int64_t cols : {7, 300, 5000}) {
      const int64_t heads = 3;
      std::vector<float> logits(heads * rows * cols), bias(heads * cols);
      for (float& x : logits) x = g(rng);
      for (float& x : bias) x = g(rng);
      for (int variant = -1; variant < 4; ++variant) {  // -1: RowSoftmaxStats; else SoftmaxWithScores(kinds[variant])
        Guarded d_logits(logits), d_bias(bias), d_max(std::vector<float>(heads * rows)),
            d_mass(std::vector<float>(heads * rows)), d_scores(std::vector<float>(heads * cols, 0.f));
        const auto kind = variant < 0 ? std::nullopt : kinds[variant];
        if (variant < 0) {
          kernels::RowSoftmaxStats(d_logits.data(), heads, rows, cols, d_bias.data(), cols, d_max.data(), d_mass.data(),
                                   rows, nullptr);
        } else {
          kernels::SoftmaxWithScores(d_logits.data(), heads, rows, cols, d_bias.data(), cols, d_max.data(), d_mass.data(),
                                     rows, kind, d_scores.data(), nullptr);
          if (kind) kernels::FinalizeScores(d_scores.data(), heads * cols, rows, *kind, nullptr);
        }
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        bool ok[4];
        const auto probs = d_logits.Read(&ok[0]);
        const auto row_max = d_max.Read(&ok[1]);
        const auto mass = d_mass.Read(&ok[2]);
        const auto scores = d_scores.Read(&ok[3]);
        for (int i = 0; i < 4; ++i) EXPECT_TRUE(ok[i]) << "guard values overwritten, output " << i;
        for (int64_t h = 0; h < heads; ++h) {
          SCOPED_TRACE(testing::Message() << "rows " << rows << " cols " << cols << " variant " << variant << " head " << h);
          MatrixF L = ConstMatrixMapF(logits.data() + h * rows * cols, rows, cols);
          L.rowwise() += ConstVectorMapF(bias.data() + h * cols, cols).transpose();
          const VectorF m = L.rowwise().maxCoeff();
          MatrixF P = (L.colwise() - m).array().exp();
          const VectorF s = P.rowwise().sum();
          P.array().colwise() /= s.array();
          EXPECT_LT(RelErr(row_max.data() + h * rows, m.data(), rows), 1e-6);
          EXPECT_LT(RelErr(mass.data() + h * rows, s.data(), rows), 1e-5);
          EXPECT_LT(RelErr(probs.data() + h * rows * cols, P.data(), rows * cols), 1e-5);
          if (!kind) {
            for (int64_t j = 0; j < cols; ++j) ASSERT_EQ(scores[h * cols + j], 0.f) << "scores written without a reduction";
            continue;
          }
          VectorF want;
          if (*kind == kernels::ScoreReduceKind::kRms) want = (P.array().square().colwise().sum() / rows).sqrt().transpose();
          if (*kind == kernels::ScoreReduceKind::kMean) want = (P.array().colwise().sum() / rows).transpose();
          if (*kind == kernels::ScoreReduceKind::kMax) want = P.colwise().maxCoeff().transpose();
          EXPECT_LT(RelErr(scores.data() + h * cols, want.data(), cols), 1e-5);
        }
      }
    }
  }
}

TEST(Kernels, ElementwiseHelpersMatchCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 33, cols = 70;
  std::vector<float> x(rows * cols), bias(cols), shift(rows);
  std::mt19937 rng(2);
  std::normal_distribution<float> g(0, 1);
  for (float& v : x) v = g(rng);
  for (float& v : bias) v = g(rng);
  for (float& v : shift) v = g(rng);
  Guarded dx(x), db(bias), ds(shift), dsum{std::vector<float>(rows)};
  kernels::ExpShifted(dx.data(), rows, cols, db.data(), ds.data(), nullptr);
  kernels::RowSums(dx.data(), rows, cols, dsum.data(), nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  bool ok1, ok2;
  const auto e = dx.Read(&ok1);
  const auto sums = dsum.Read(&ok2);
  EXPECT_TRUE(ok1 && ok2);
  for (int64_t i = 0; i < rows; ++i) {
    double row = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const float want = std::exp(x[i * cols + j] + bias[j] - shift[i]);
      EXPECT_NEAR(e[i * cols + j], want, 1e-5f * want + 1e-7f);
      row += want;
    }
    EXPECT_NEAR(sums[i], row, 1e-5 * row);
  }
}

struct Case {
  int64_t tokens, head_dim, ratio;
  Method method;
  DType dtype;
  bool bias;
  float holdout;
};

std::string Name(const Case& c) {
  return std::string(GetMethodSpec(c.method).name) + " T=" + std::to_string(c.tokens) + " d=" + std::to_string(c.head_dim) +
         " ratio=" + std::to_string(c.ratio) + " " + std::string(DTypeName(c.dtype)) + (c.bias ? " bias" : "") +
         " holdout=" + std::to_string(c.holdout);
}

LayerJob MakeJob(const Case& c, uint64_t seed) {
  SyntheticShape shape;
  shape.heads = 3;
  shape.tokens = c.tokens;
  shape.queries = 512;
  shape.head_dim = shape.value_dim = c.head_dim;
  LayerJob job;
  job.data = MakeSyntheticLayer(shape, seed, 2);
  for (auto* v : {&job.data.keys, &job.data.values, &job.data.query_data}) RoundThrough(*v, c.dtype);
  if (c.bias) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> g(0, 0.5f);
    job.data.bias.resize(shape.heads * shape.tokens);
    for (float& b : job.data.bias) b = g(rng);
  }
  job.options.method = c.method;
  job.options.holdout_fraction = c.holdout;
  job.options.seed = seed;
  // Ragged: head h gets (h + 1) / 2 times the nominal budget.
  for (int64_t h = 0; h < shape.heads; ++h) job.budgets.push_back(std::max<int64_t>(1, c.tokens * (h + 1) / (2 * c.ratio)));
  return job;
}

void ExpectSameResult(const LayerResult& gpu, const LayerResult& cpu, const std::string& name) {
  ASSERT_EQ(gpu.heads.size(), cpu.heads.size()) << name;
  for (size_t h = 0; h < cpu.heads.size(); ++h) {
    const CompactedHead& g = gpu.heads[h];
    const CompactedHead& c = cpu.heads[h];
    const std::string where = name + " head " + std::to_string(h);
    ASSERT_EQ(g.indices.size(), c.indices.size()) << where;
    size_t same = 0;
    for (size_t i = 0; i < c.indices.size(); ++i) same += std::binary_search(g.indices.begin(), g.indices.end(), c.indices[i]);
    // Scores are sums in a different order; a key tied at the t-th place within fp32 rounding may flip.
    EXPECT_GE(same, c.indices.size() - std::max<size_t>(1, c.indices.size() / 100)) << where;
    EXPECT_TRUE(g.beta.allFinite() && g.values.allFinite() && g.keys.allFinite()) << where;
    if (g.indices == c.indices) {
      EXPECT_EQ(g.keys, c.keys) << where;
      EXPECT_LT((g.beta - c.beta).cwiseAbs().maxCoeff(), 2e-3f) << where;
      EXPECT_LT(RelErr(g.values.data(), c.values.data(), c.values.size()), 2e-3) << where;
    }
    EXPECT_EQ(g.quality.has_quality, c.quality.has_quality) << where;
    EXPECT_EQ(g.quality.eval_queries, c.quality.eval_queries) << where;
    EXPECT_NEAR(g.quality.output_rel_error, c.quality.output_rel_error, 2e-3f + 0.02f * c.quality.output_rel_error) << where;
    EXPECT_NEAR(g.quality.mass_rel_error, c.quality.mass_rel_error, 2e-3f + 0.02f * c.quality.mass_rel_error) << where;
  }
}

TEST(CudaBackend, MatchesCpuBackendOverAGrid) {
  SKIP_WITHOUT_GPU();
  auto gpu = kernels::MakeCudaBackend({});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = MakeCpuBackend(4);
  std::vector<Case> cases;
  for (int64_t T : {256, 1000, 3000})
    for (int64_t d : {64, 128})
      for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
        cases.push_back({T, d, T >= 1000 ? 20 : 4, Method::kAmHighestAttention, dt, T == 1000, T == 3000 ? 0.f : 0.2f});
  for (Method m : {Method::kH2O, Method::kSnapKV, Method::kTruncateRecent, Method::kStreamingLlm, Method::kRandom})
    cases.push_back({1000, 64, 10, m, DType::kFloat32, true, 0.1f});
  cases.push_back({300, 64, 1, Method::kAmHighestAttention, DType::kFloat32, true, 0.1f});  // t >= T for two heads
  uint64_t seed = 100;
  for (const Case& c : cases) {
    LayerJob job = MakeJob(c, ++seed);
    // Each mass-fit solver on both backends (the backends' defaults differ: compared below).
    for (MassFitSolver solver : {MassFitSolver::kAccelerated, MassFitSolver::kNewton}) {
      job.options.mass_fit_solver = solver;
      const std::string name = Name(c) + (solver == MassFitSolver::kNewton ? " newton" : " accelerated");
      auto g = (*gpu)->CompactLayer(job);
      auto r = cpu->CompactLayer(job);
      ASSERT_TRUE(g.ok()) << name << ": " << g.status();
      ASSERT_TRUE(r.ok()) << name << ": " << r.status();
      ExpectSameResult(*g, *r, name);
    }
  }
}

// The composite key scores (the RMS with the largest attention or with coverage, core/attention.h)
// on the device's unfused path, also when the fused one would run: the same keys as the CPU's.
TEST(CudaBackend, CompositeScoresMatchCpuBackend) {
  SKIP_WITHOUT_GPU();
  kernels::CudaBackendOptions tensor_cores;
  tensor_cores.allow_tf32 = true;
  auto cpu = MakeCpuBackend(4);
  uint64_t seed = 300;
  for (const kernels::CudaBackendOptions& options : {kernels::CudaBackendOptions{}, tensor_cores}) {
    auto gpu = kernels::MakeCudaBackend(options);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    for (ScoreReduce score : {ScoreReduce::kRmsMax, ScoreReduce::kCoverage, ScoreReduce::kRmsCoverage}) {
      for (int64_t T : {300, 3000}) {
        const Case c{T, 64, 10, Method::kAmHighestAttention, options.allow_tf32 ? DType::kBFloat16 : DType::kFloat32,
                     T == 3000, 0.1f};
        LayerJob job = MakeJob(c, ++seed);
        job.options.score = score;
        const std::string name = Name(c) + " score " + std::string(ScoreReduceName(score));
        auto g = (*gpu)->CompactLayer(job);
        auto r = cpu->CompactLayer(job);
        ASSERT_TRUE(g.ok()) << name << ": " << g.status();
        ASSERT_TRUE(r.ok()) << name << ": " << r.status();
        for (size_t h = 0; h < r->heads.size(); ++h) {
          const auto &gi = g->heads[h].indices, &ri = r->heads[h].indices;
          ASSERT_EQ(gi.size(), ri.size()) << name;
          size_t same = 0;
          for (int32_t i : ri) same += std::binary_search(gi.begin(), gi.end(), i);
          // Near-equal logits may name another most-attended key, or swap two ranks at the edge.
          EXPECT_GE(same, ri.size() * 95 / 100) << name << " head " << h;
          EXPECT_NEAR(g->heads[h].quality.output_rel_error, r->heads[h].quality.output_rel_error,
                      3e-3f + 0.03f * r->heads[h].quality.output_rel_error)
              << name << " head " << h;
        }
      }
    }
  }
}

// The GPU's default mass fit (accelerated) against the CPU's (projected Newton, 6 iterations):
// no worse on held-out queries, head by head.
TEST(CudaBackend, DefaultMassFitsAreAsGoodAsTheCpuBackends) {
  SKIP_WITHOUT_GPU();
  auto gpu = kernels::MakeCudaBackend({});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = MakeCpuBackend(4);
  uint64_t seed = 500;
  for (int64_t T : {1000, 3000})
    for (int ratio : {4, 20}) {
      const Case c{T, 128, ratio, Method::kAmHighestAttention, DType::kFloat32, false, 0.2f};
      const LayerJob job = MakeJob(c, ++seed);
      auto g = (*gpu)->CompactLayer(job);
      auto r = cpu->CompactLayer(job);
      ASSERT_TRUE(g.ok() && r.ok()) << Name(c);
      for (size_t h = 0; h < r->heads.size(); ++h) {
        EXPECT_LE(g->heads[h].quality.output_rel_error, 1.02f * r->heads[h].quality.output_rel_error + 1e-3f)
            << Name(c) << " head " << h;
      }
    }
}

// OMP: the device builds each head's candidate-pool system in fp32 (a different summation order
// than the CPU's), so a near-tie may send the greedy path elsewhere; the kept sets must still
// mostly agree and the held-out errors match closely.
TEST(CudaBackend, OmpMatchesCpuBackend) {
  SKIP_WITHOUT_GPU();
  auto gpu = kernels::MakeCudaBackend({});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = MakeCpuBackend(4);
  const std::vector<Case> cases = {{1000, 64, 10, Method::kAmOmp, DType::kFloat32, true, 0.1f},
                                   {3000, 128, 20, Method::kAmOmpFast, DType::kBFloat16, false, 0.2f},
                                   {2500, 64, 50, Method::kAmOmpFast, DType::kFloat32, false, 0.1f}};
  uint64_t seed = 300;
  for (const Case& c : cases) {
    LayerJob job = MakeJob(c, ++seed);
    if (c.tokens == 2500) job.options.omp_pool = 400;  // a pool smaller than T: the device's scores pick it
    auto g = (*gpu)->CompactLayer(job);
    auto r = cpu->CompactLayer(job);
    ASSERT_TRUE(g.ok()) << Name(c) << ": " << g.status();
    ASSERT_TRUE(r.ok()) << Name(c) << ": " << r.status();
    for (size_t h = 0; h < r->heads.size(); ++h) {
      const CompactedHead& gh = g->heads[h];
      const CompactedHead& ch = r->heads[h];
      const std::string where = Name(c) + " head " + std::to_string(h);
      ASSERT_EQ(gh.indices.size(), ch.indices.size()) << where;
      size_t same = 0;
      for (int32_t i : ch.indices) same += std::binary_search(gh.indices.begin(), gh.indices.end(), i);
      EXPECT_GE(same, ch.indices.size() * 9 / 10) << where;
      EXPECT_TRUE(gh.beta.allFinite() && gh.values.allFinite()) << where;
      EXPECT_NEAR(gh.quality.output_rel_error, ch.quality.output_rel_error, 0.005f + 0.05f * ch.quality.output_rel_error) << where;
      EXPECT_NEAR(gh.quality.mass_rel_error, ch.quality.mass_rel_error, 0.005f + 0.05f * ch.quality.mass_rel_error) << where;
    }
  }
}

// The greedy loop reading G = Phi^T Phi on the device (DeviceOmpGram, from fp32 features) against
// the host loop on the float64 Gram matrix of the same features: the P-vectors agree to float64
// rounding, the blocks to fp32 products', and the selections are the same keys up to a near-tie.
TEST(DeviceOmpGram, ReadsAndSelectionsMatchTheHostGramOfTheSameFeatures) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(11);
  std::exponential_distribution<double> e(1.0);
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  cublasHandle_t blas;
  ASSERT_EQ(cublasCreate(&blas), CUBLAS_STATUS_SUCCESS);
  cublasSetStream(blas, stream);
  cublasSetMathMode(blas, CUBLAS_PEDANTIC_MATH);
  for (auto [pool, n] : {std::pair<int64_t, int64_t>{1, 5}, {37, 300}, {700, 300}, {2100, 511}}) {
    MatrixF phi_t(pool, n);  // row j: key j's features over the n queries
    for (Eigen::Index i = 0; i < phi_t.size(); ++i) phi_t.data()[i] = static_cast<float>(std::pow(e(rng), 3.0) * 1e-2);
    const MatrixD phi = phi_t.cast<double>().transpose();
    const MatrixD gram = phi.transpose() * phi;
    const VectorD rhs = phi.transpose() * VectorD(phi.rowwise().sum() * 0.9);
    kernels::DeviceBuffer<float> device_phi_t;
    ASSERT_TRUE(device_phi_t.Reserve(pool * n).ok());
    ASSERT_EQ(cudaMemcpy(device_phi_t.get(), phi_t.data(), pool * n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
    const int64_t budget = std::max<int64_t>(1, pool / 5);
    kernels::DeviceOmpGram reads;
    ASSERT_TRUE(reads.Reserve(pool, n, budget).ok());
    reads.Bind(device_phi_t.get(), pool, n, stream, blas);
    // Single reads.
    EXPECT_NEAR(reads.MeanDiagonal(), gram.diagonal().mean(), 1e-12 * gram.diagonal().mean());
    std::vector<int32_t> cols;
    for (int64_t j = 0; j < budget; ++j) cols.push_back(static_cast<int32_t>((j * 7919) % pool));
    const VectorD w = VectorD::LinSpaced(budget, 0.5, 2.0);
    VectorD into = VectorD::LinSpaced(pool, -1.0, 1.0), want = into;
    for (int64_t a = 0; a < budget; ++a) want += gram.col(cols[a]) * w[a];
    reads.Accumulate(cols, w, &into);
    EXPECT_LT((into - want).cwiseAbs().maxCoeff(), 1e-12 * want.cwiseAbs().maxCoeff());
    const std::vector<int32_t> reversed(cols.rbegin(), cols.rend());
    const MatrixD block = reads.Block(cols, reversed);
    for (int64_t r = 0; r < budget; ++r) {
      for (int64_t c = 0; c < budget; ++c) {
        const double g = gram(cols[r], reversed[c]);  // sums of positive terms: fp32 within n ulps
        ASSERT_NEAR(block(r, c), g, 4e-5 * g) << "pool " << pool << " (" << r << ", " << c << ")";
      }
    }
    ASSERT_TRUE(reads.status().ok()) << reads.status();
    // Whole selections, with the progressive schedule and drop rounds the service uses.
    OmpParams p;
    p.budget = budget;
    p.keys_per_step = 4;
    p.refit_interval = 2;
    p.progressive = 0.1;
    const OmpResult device = SelectOmp(reads, rhs, p);
    const OmpResult host = SelectOmp(gram, rhs, p);
    ASSERT_TRUE(reads.status().ok()) << reads.status();
    ASSERT_EQ(device.selected.size(), host.selected.size());
    std::vector<int32_t> a = device.selected, b = host.selected, both;
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
    EXPECT_GE(both.size(), 0.95 * b.size()) << "pool " << pool;
    std::printf("pool %ld: %zu of %zu keys the same, order %s\n", long(pool), both.size(), b.size(),
                device.selected == host.selected ? "the same" : "differs");
    // A read beyond the reserved budget is an error, not an overflow.
    std::vector<int32_t> too_many(budget + 1, 0);
    reads.Accumulate(too_many, VectorD::Ones(too_many.size()), &into);
    EXPECT_FALSE(reads.status().ok());
    // Reused across sizes (as a backend reuses it across layers): a larger pool with a smaller
    // budget after a smaller pool with a larger budget still holds the larger budget's reads.
    kernels::DeviceOmpGram reused;
    ASSERT_TRUE(reused.Reserve(budget, n, budget).ok());
    ASSERT_TRUE(reused.Reserve(pool, n, 1).ok());
    reused.Bind(device_phi_t.get(), pool, n, stream, blas);
    VectorD again = VectorD::LinSpaced(pool, -1.0, 1.0);
    reused.Accumulate(cols, w, &again);
    ASSERT_TRUE(reused.status().ok()) << reused.status();
    EXPECT_LT((again - want).cwiseAbs().maxCoeff(), 1e-12 * want.cwiseAbs().maxCoeff());
  }
  cublasDestroy(blas);
  cudaStreamDestroy(stream);
}

TEST(CudaBackend, SmallWorkspaceChunksQueriesWithoutChangingResults) {
  SKIP_WITHOUT_GPU();
  kernels::CudaBackendOptions small;
  small.workspace_bytes = 3 * 1000 * 4 * 37;  // 37 query rows per chunk
  auto chunked = kernels::MakeCudaBackend(small);
  auto whole = kernels::MakeCudaBackend({});
  ASSERT_TRUE(chunked.ok() && whole.ok());
  const LayerJob job = MakeJob({1000, 64, 10, Method::kAmHighestAttention, DType::kFloat32, false, 0.1f}, 7);
  auto a = (*chunked)->CompactLayer(job);
  auto b = (*whole)->CompactLayer(job);
  ASSERT_TRUE(a.ok() && b.ok());
  for (size_t h = 0; h < a->heads.size(); ++h) {
    EXPECT_EQ(a->heads[h].indices, b->heads[h].indices);
    EXPECT_LT((a->heads[h].beta - b->heads[h].beta).cwiseAbs().maxCoeff(), 1e-4f);
  }
}

// The value fits and evaluations of a layer's heads spread over lanes (streams with their own
// handles and buffers): the same results with one lane, two (heads 0 and 2 share lane 0, after
// the mass fit there) and more lanes than heads; ragged budgets, a bias, held-out queries.
TEST(CudaBackend, HeadLanesGiveTheSameResults) {
  SKIP_WITHOUT_GPU();
  const LayerJob job = MakeJob({1000, 64, 10, Method::kAmHighestAttention, DType::kFloat32, true, 0.1f}, 41);
  std::vector<LayerResult> results;
  for (int lanes : {1, 2, 8}) {
    kernels::CudaBackendOptions options;
    options.head_lanes = lanes;
    auto gpu = kernels::MakeCudaBackend(options);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    for (int pass = 0; pass < 2; ++pass) {  // the second layer reuses the lanes' buffers
      auto r = (*gpu)->CompactLayer(job);
      ASSERT_TRUE(r.ok()) << "lanes " << lanes << ": " << r.status();
      results.push_back(*std::move(r));
    }
  }
  const LayerResult& one = results[0];
  for (size_t k = 1; k < results.size(); ++k) {
    for (size_t h = 0; h < one.heads.size(); ++h) {
      const CompactedHead &a = one.heads[h], &b = results[k].heads[h];
      SCOPED_TRACE(testing::Message() << "run " << k << " head " << h);
      EXPECT_EQ(a.indices, b.indices);
      EXPECT_EQ(a.selection_kept, b.selection_kept);
      EXPECT_LT((a.beta - b.beta).cwiseAbs().maxCoeff(), 1e-6f);
      ASSERT_EQ(a.values.size(), b.values.size());
      EXPECT_LT(RelErr(b.values.data(), a.values.data(), a.values.size()), 1e-5);
      EXPECT_NEAR(a.quality.output_rel_error, b.quality.output_rel_error, 1e-5f);
      EXPECT_NEAR(a.quality.fit_output_rel_error, b.quality.fit_output_rel_error, 1e-5f);
      EXPECT_EQ(a.quality.eval_queries, b.quality.eval_queries);
    }
  }
}

TEST(CudaBackend, BadJobsAreStatusesNotCrashes) {
  SKIP_WITHOUT_GPU();
  auto gpu = kernels::MakeCudaBackend({});
  ASSERT_TRUE(gpu.ok());
  LayerJob job = MakeJob({256, 64, 4, Method::kAmHighestAttention, DType::kFloat32, false, 0.1f}, 3);
  job.budgets.pop_back();
  EXPECT_EQ((*gpu)->CompactLayer(job).status().code(), absl::StatusCode::kInvalidArgument);
  job = MakeJob({256, 64, 4, Method::kAmHighestAttention, DType::kFloat32, false, 0.1f}, 3);
  job.data.queries = 0;
  job.data.query_data.clear();
  EXPECT_EQ((*gpu)->CompactLayer(job).status().code(), absl::StatusCode::kInvalidArgument);
  // The backend is still usable afterwards.
  job = MakeJob({256, 64, 4, Method::kAmHighestAttention, DType::kFloat32, false, 0.1f}, 3);
  EXPECT_TRUE((*gpu)->CompactLayer(job).ok());
}

TEST(CudaBackend, MemoryLimitSplitsTheLayerIntoHeadGroups) {
  SKIP_WITHOUT_GPU();
  const LayerJob job = MakeJob({1000, 64, 10, Method::kAmHighestAttention, DType::kFloat32, true, 0.1f}, 21);
  kernels::CudaBackendOptions whole_options, limited_options, tiny_options;
  whole_options.workspace_bytes = limited_options.workspace_bytes = tiny_options.workspace_bytes = size_t{1} << 20;
  const kernels::DeviceBytes need = kernels::EstimateDeviceBytes(job, whole_options.workspace_bytes);
  ASSERT_GT(need.per_head, 0u);
  limited_options.memory_limit_bytes = need.fixed + need.per_head * 3 / 2;  // one head at a time
  tiny_options.memory_limit_bytes = need.fixed / 2;                         // not even one head
  auto whole = kernels::MakeCudaBackend(whole_options);
  auto limited = kernels::MakeCudaBackend(limited_options);
  auto tiny = kernels::MakeCudaBackend(tiny_options);
  ASSERT_TRUE(whole.ok() && limited.ok() && tiny.ok());
  auto a = (*whole)->CompactLayer(job);
  auto b = (*limited)->CompactLayer(job);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->heads.size(), b->heads.size());
  for (size_t h = 0; h < a->heads.size(); ++h) {
    EXPECT_EQ(a->heads[h].indices, b->heads[h].indices) << "head " << h;
    EXPECT_LT((a->heads[h].beta - b->heads[h].beta).cwiseAbs().maxCoeff(), 1e-4f) << "head " << h;
    EXPECT_LT(RelErr(b->heads[h].values.data(), a->heads[h].values.data(), a->heads[h].values.size()), 1e-4) << "head " << h;
    EXPECT_EQ(a->heads[h].quality.eval_queries, b->heads[h].quality.eval_queries);
  }
  auto refused = (*tiny)->CompactLayer(job);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("--cuda_memory_limit_bytes"), std::string_view::npos) << refused.status();
  EXPECT_TRUE((*tiny)->healthy());
}

// The worker hands the next layer to Prefetch before running the current one; whatever the order
// of hints (one never followed by its layer, a layer compacted twice), results do not change.
TEST(CudaBackend, PrefetchedLayersGiveTheSameResults) {
  SKIP_WITHOUT_GPU();
  std::vector<std::shared_ptr<const LayerJob>> jobs;
  for (uint64_t seed : {31, 32, 33}) {
    jobs.push_back(std::make_shared<LayerJob>(MakeJob({1000, 64, 10, Method::kAmHighestAttention, DType::kFloat32, true, 0.1f}, seed)));
  }
  auto plain = kernels::MakeCudaBackend({});
  auto hinted = kernels::MakeCudaBackend({});
  ASSERT_TRUE(plain.ok() && hinted.ok());
  std::vector<LayerResult> want;
  for (const auto& job : jobs) {
    auto r = (*plain)->CompactLayer(*job);
    ASSERT_TRUE(r.ok()) << r.status();
    want.push_back(*std::move(r));
  }
  auto expect_same = [&](const absl::StatusOr<LayerResult>& got, int j, const char* step) {
    ASSERT_TRUE(got.ok()) << step << ": " << got.status();
    for (size_t h = 0; h < want[j].heads.size(); ++h) {
      EXPECT_EQ(got->heads[h].indices, want[j].heads[h].indices) << step << " head " << h;
      EXPECT_LT((got->heads[h].beta - want[j].heads[h].beta).cwiseAbs().maxCoeff(), 1e-6f) << step << " head " << h;
      EXPECT_LT(RelErr(got->heads[h].values.data(), want[j].heads[h].values.data(), want[j].heads[h].values.size()), 1e-6)
          << step << " head " << h;
    }
  };
  Backend& b = **hinted;
  b.Prefetch(jobs[1]);
  expect_same(b.CompactLayer(*jobs[0]), 0, "0 (uploaded directly while 1 is prefetched)");
  b.Prefetch(jobs[2]);
  expect_same(b.CompactLayer(*jobs[1]), 1, "1 (prefetched)");
  b.Prefetch(jobs[0]);  // a hint never followed
  expect_same(b.CompactLayer(*jobs[2]), 2, "2 (prefetched)");
  expect_same(b.CompactLayer(*jobs[1]), 1, "1 again (stale hints around)");
  expect_same(b.CompactLayer(*jobs[0]), 0, "0 (the old hint)");
}

// Layers whose inputs arrived in bf16 cross the host and the link as bf16 and are widened on the
// device: exact, so the results are bit for bit those of the same values uploaded as fp32.
TEST(CudaBackend, Bf16UploadIsExact) {
  SKIP_WITHOUT_GPU();
  for (bool prefetch : {false, true}) {
    auto a = kernels::MakeCudaBackend({});
    auto b = kernels::MakeCudaBackend({});
    ASSERT_TRUE(a.ok() && b.ok());
    auto as_fp32 = std::make_shared<LayerJob>(MakeJob({1000, 64, 10, Method::kAmHighestAttention, DType::kBFloat16, true, 0.1f}, 41));
    auto as_bf16 = std::make_shared<LayerJob>(*as_fp32);
    as_bf16->data.inputs_dtype = DType::kBFloat16;
    if (prefetch) (*b)->Prefetch(as_bf16);
    auto want = (*a)->CompactLayer(*as_fp32);
    auto got = (*b)->CompactLayer(*as_bf16);
    ASSERT_TRUE(want.ok() && got.ok());
    for (size_t h = 0; h < want->heads.size(); ++h) {
      EXPECT_EQ(got->heads[h].indices, want->heads[h].indices) << "head " << h;
      EXPECT_EQ(got->heads[h].beta, want->heads[h].beta) << "head " << h;
      EXPECT_EQ(got->heads[h].values, want->heads[h].values) << "head " << h;
      EXPECT_EQ(got->heads[h].quality.output_rel_error, want->heads[h].quality.output_rel_error) << "head " << h;
    }
  }
}

}  // namespace
}  // namespace kvcompact
