// BENCH-A: the CUDA backend on one GPU for a whole context, layer after layer, as the server's
// worker runs it. Default geometry: Llama-3.1-8B (32 layers x 8 KV heads x d=128), T=60,000,
// 8,192 reference queries per KV head, 50x uniform, AM highest attention, 10% held out.
// `--distinct` layers of synthetic data are generated on the host and reused for all layers (the
// timing does not depend on the values). Prints a table and, last, one JSON line.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <thread>

#include <cuda_runtime.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "core/budget.h"
#include "core/dtype.h"
#include "core/method.h"
#include "core/synthetic.h"
#include "kernels/cuda_backend.h"

ABSL_FLAG(uint32_t, layers, 32, "layers");
ABSL_FLAG(uint32_t, kv_heads, 8, "KV heads");
ABSL_FLAG(uint32_t, head_dim, 128, "head dim");
ABSL_FLAG(uint32_t, tokens, 60000, "T per layer");
ABSL_FLAG(uint32_t, queries, 8192, "reference queries per KV head");
ABSL_FLAG(double, ratio, 50, "compaction ratio");
ABSL_FLAG(std::string, method, "am", "method name");
ABSL_FLAG(std::string, score, "",
          "key score (RMS, MEAN, MAX, RMS_MAX, COVERAGE, RMS_COVERAGE; empty: the method's)");
ABSL_FLAG(uint32_t, omp_keys_per_step, 0, "OMP methods: k (0: the method's)");
ABSL_FLAG(double, omp_progressive, 0, "OMP methods: progressive schedule fraction (0: off)");
ABSL_FLAG(bool, allow_tf32, false, "TF32 tensor-op math in cuBLAS");
ABSL_FLAG(bool, fused_stats, true,
          "with --allow_tf32 and --dtype=bf16/fp16: attention statistics by the fused kernels (false: cuBLAS over logit chunks)");
ABSL_FLAG(std::string, dtype, "fp32",
          "the wire dtype of keys, values and queries (fp32, bf16, fp16): the generated layer is rounded through it, as the "
          "server's decode yields it");
ABSL_FLAG(int, mass_fit_iterations, 0, "the mass fit's iteration bound (0: the service's for the solver)");
ABSL_FLAG(uint32_t, head_lanes, kvcompact::kernels::CudaBackendOptions{}.head_lanes,
          "streams over which a layer's value fits and evaluations are spread (1: every head on the backend's stream)");
ABSL_FLAG(bool, mass_fit_newton, false, "the mass fit by projected Newton (cuSOLVER Cholesky) instead of the accelerated solver");
ABSL_FLAG(uint32_t, distinct, 2, "distinct generated layers, reused round-robin");
ABSL_FLAG(double, holdout, 0.1, "held-out share of queries");
ABSL_FLAG(bool, prefetch, true, "hand the next layer to Backend::Prefetch before each layer, as the server's worker does");
ABSL_FLAG(uint32_t, concurrent_layers, 1,
          "layers in flight on the GPU at once: that many backends, each on its own thread, streams and handles, "
          "taking the next layer in turn");

namespace {

// Rounds the layer's keys, values and queries through `wire`, as the server's decode yields them,
// and records the dtype they are exact in.
void RoundThroughWire(kvcompact::LayerData& data, kvcompact::DType wire) {
  for (auto* v : {&data.keys, &data.values, &data.query_data}) kvcompact::RoundThrough(*v, wire);
  data.inputs_dtype = wire;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace kvcompact;
  using Clock = std::chrono::steady_clock;
  kernels::CudaBackendOptions options;
  options.allow_tf32 = absl::GetFlag(FLAGS_allow_tf32);
  options.fused_stats = absl::GetFlag(FLAGS_fused_stats);
  options.mass_fit_max_iterations = absl::GetFlag(FLAGS_mass_fit_iterations);
  options.mass_fit_newton = absl::GetFlag(FLAGS_mass_fit_newton);
  options.head_lanes = static_cast<int>(absl::GetFlag(FLAGS_head_lanes));
  const uint32_t concurrent = std::max(1u, absl::GetFlag(FLAGS_concurrent_layers));
  // As the server makes its lanes: each backend with an equal share of the memory bound.
  auto made = kernels::MakeCudaBackends(options, static_cast<int>(concurrent));
  if (!made.ok()) {
    fprintf(stderr, "%s\n", made.status().ToString().c_str());
    return 1;
  }
  std::vector<std::unique_ptr<Backend>> backends = *std::move(made);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  DType wire = DType::kFloat32;
  const std::string dtype_flag = absl::GetFlag(FLAGS_dtype);
  if (!ParseDTypeName(dtype_flag == "fp32" ? "F32" : dtype_flag == "fp16" ? "F16" : dtype_flag == "bf16" ? "BF16" : "",
                      &wire)) {
    fprintf(stderr, "--dtype: %s is not fp32, bf16 or fp16\n", dtype_flag.c_str());
    return 1;
  }
  SyntheticShape shape;
  shape.heads = absl::GetFlag(FLAGS_kv_heads);
  shape.tokens = absl::GetFlag(FLAGS_tokens);
  shape.queries = absl::GetFlag(FLAGS_queries);
  shape.head_dim = shape.value_dim = absl::GetFlag(FLAGS_head_dim);
  const auto gen_start = Clock::now();
  std::vector<std::shared_ptr<LayerJob>> jobs(absl::GetFlag(FLAGS_distinct));
  for (size_t i = 0; i < jobs.size(); ++i) {
    jobs[i] = std::make_shared<LayerJob>();
    jobs[i]->data = MakeSyntheticLayer(shape, 1, static_cast<int32_t>(i));
    RoundThroughWire(jobs[i]->data, wire);
    jobs[i]->options.method = *MethodFromName(absl::GetFlag(FLAGS_method));
    jobs[i]->options.holdout_fraction = absl::GetFlag(FLAGS_holdout);
    jobs[i]->options.score = ScoreReduceFromName(absl::GetFlag(FLAGS_score));
    if (!absl::GetFlag(FLAGS_score).empty() && !jobs[i]->options.score) {
      fprintf(stderr, "unknown --score %s\n", absl::GetFlag(FLAGS_score).c_str());
      return 2;
    }
    jobs[i]->options.omp_keys_per_step = static_cast<int>(absl::GetFlag(FLAGS_omp_keys_per_step));
    jobs[i]->options.omp_progressive = absl::GetFlag(FLAGS_omp_progressive);
    jobs[i]->budgets.assign(shape.heads, RatioBudget(shape.tokens, absl::GetFlag(FLAGS_ratio)));
  }
  const double gen_s = std::chrono::duration<double>(Clock::now() - gen_start).count();
  // Warm-up on a small problem: module load and handle creation stay out of the numbers.
  for (auto& backend : backends) {
    SyntheticShape small = shape;
    small.tokens = 512;
    small.queries = 256;
    LayerJob warm;
    warm.data = MakeSyntheticLayer(small, 2);
    warm.budgets.assign(small.heads, 32);
    if (auto r = backend->CompactLayer(warm); !r.ok()) {
      fprintf(stderr, "warm-up: %s\n", r.status().ToString().c_str());
      return 1;
    }
  }
  const uint32_t layers = absl::GetFlag(FLAGS_layers);
  std::vector<double> wall(layers);
  StageSeconds sum;
  double err = 0;
  int64_t iterations_sum = 0;
  int iterations_max = 0, not_converged = 0;
  int64_t weights = 0, at_bound = 0;  // mass weights, and those the fit left at a bound of beta
  std::mutex mu;
  bool failed = false;
  double prefetch_calls = 0, compact_calls = 0;  // host seconds inside each call, summed over layers
  // Backend i takes layers i, i + K, i + 2K, ... (K = --concurrent_layers), prefetching its next.
  auto run = [&](uint32_t first) {
    Backend& backend = *backends[first];
    for (uint32_t l = first; l < layers; l += concurrent) {
      const auto t0 = Clock::now();
      if (absl::GetFlag(FLAGS_prefetch) && l + concurrent < layers) backend.Prefetch(jobs[(l + concurrent) % jobs.size()]);
      const auto t1 = Clock::now();  // Prefetch first waits for the previous layer's upload
      auto r = backend.CompactLayer(*jobs[l % jobs.size()]);
      std::lock_guard<std::mutex> lock(mu);
      wall[l] = std::chrono::duration<double>(Clock::now() - t0).count();
      prefetch_calls += std::chrono::duration<double>(t1 - t0).count();
      compact_calls += std::chrono::duration<double>(Clock::now() - t1).count();
      if (!r.ok()) {
        fprintf(stderr, "layer %u: %s\n", l, r.status().ToString().c_str());
        failed = true;
        return;
      }
      sum += r->seconds;
      int layer_iterations = 0;
      for (const auto& h : r->heads) layer_iterations = std::max(layer_iterations, h.mass_fit_iterations);
      fprintf(stderr, "layer %u: %.4f s (NNLS %.4f s so far), NNLS iterations at most %d\n", l, wall[l], sum.mass_solve,
              layer_iterations);
      for (const auto& h : r->heads) {
        err += h.quality.output_rel_error / (shape.heads * layers);
        iterations_sum += h.mass_fit_iterations;
        iterations_max = std::max(iterations_max, h.mass_fit_iterations);
        not_converged += !h.mass_fit_converged;
        const MethodSpec& spec = GetMethodSpec(jobs[l % jobs.size()]->options.method);
        for (float b : h.beta) {  // no bias in the generated layers: beta = log w
          ++weights;
          at_bound += std::abs(b - spec.default_beta_min) < 1e-4 || std::abs(b - spec.default_beta_max) < 1e-4;
        }
      }
    }
  };
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (uint32_t i = 0; i < concurrent; ++i) threads.emplace_back(run, i);
  for (auto& t : threads) t.join();
  if (failed) return 1;
  const double total = std::chrono::duration<double>(Clock::now() - start).count();
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  const double n = shape.queries, T = shape.tokens, d = shape.head_dim;
  const double flops = 4.0 * n * T * d * shape.heads * layers;  // Q K^T and A V over all queries
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%d", std::gmtime(&now));
  printf("BENCH-A  %s  %s (%d SMs), math %s, next-layer prefetch %s, %u layer(s) in flight\n", date, prop.name,
         prop.multiProcessorCount, options.allow_tf32 ? "TF32" : "fp32", absl::GetFlag(FLAGS_prefetch) ? "on" : "off",
         concurrent);
  printf("geometry: %u layers x %lld KV heads x d=%lld, T=%lld, n=%lld, %.0fx, method %s (data generated in %.1f s)\n", layers,
         (long long)shape.heads, (long long)shape.head_dim, (long long)shape.tokens, (long long)shape.queries,
         absl::GetFlag(FLAGS_ratio), absl::GetFlag(FLAGS_method).c_str(), gen_s);
  std::vector<double> sorted = wall;
  std::sort(sorted.begin(), sorted.end());
  printf("%-28s %10s\n", "quantity", "value");
  printf("%-28s %10.3f\n", "total wall s (all layers)", total);
  printf("%-28s %10.4f\n", "median layer s", sorted[sorted.size() / 2]);
  // With several layers in flight the stage times overlap: their sums exceed the wall time.
  if (concurrent == 1) printf("%-28s %10.3f\n", "total without H2D wait s", total - sum.upload);
  printf("%-28s %10.3f\n", "stage score s (incl. H2D)", sum.score);
  printf("%-28s %10.3f\n", "  of which waiting for H2D s", sum.upload);
  printf("%-28s %10.3f\n", "Prefetch calls s", prefetch_calls);
  printf("%-28s %10.3f\n", "CompactLayer calls s", compact_calls);
  printf("%-28s %10.3f\n", "stage mass fit s", sum.mass_fit);
  printf("%-28s %10.3f\n", "  of which NNLS solve s", sum.mass_solve);
  printf("%-28s %10.3f\n", "stage value fit s", sum.value_fit);
  printf("%-28s %10.3f\n", "stage evaluate s", sum.evaluate);
  printf("%-28s %10.1f\n", "QK^T + AV TFLOP", flops / 1e12);
  printf("%-28s %10.1f\n", "achieved TFLOP/s (total)", flops / 1e12 / total);
  printf("%-28s %10.4f\n", "mean held-out output error", err);
  printf("%-28s %10.1f\n", "NNLS iterations mean", static_cast<double>(iterations_sum) / (shape.heads * layers));
  printf("%-28s %10d\n", "NNLS iterations max", iterations_max);
  printf("%-28s %10d\n", "NNLS not converged heads", not_converged);
  printf("%-28s %10.3f\n", "mass weights at a bound", weights ? static_cast<double>(at_bound) / weights : 0.0);
  printf("%-28s %10.1f\n", "GPU memory in use GiB", (total_b - free_b) / 1073741824.0);
  printf("{\"bench\":\"BENCH-A\",\"gpu\":\"%s\",\"math\":\"%s\",\"dtype\":\"%s\",\"fused_stats\":%s,\"prefetch\":%s,\"concurrent_layers\":%u,\"total_s\":%.4f,\"without_h2d_s\":%.4f,\"tflop\":%.2f,\"score_s\":%.4f,\"mass_fit_s\":%.4f,"
         "\"value_fit_s\":%.4f,\"evaluate_s\":%.4f,\"upload_s\":%.4f,\"nnls_s\":%.4f,\"mean_output_rel_error\":%.5f,\"tokens\":%lld,\"t\":%lld,\"nnls_iter_mean\":%.1f,\"nnls_iter_max\":%d,\"not_converged\":%d}\n",
         prop.name, options.allow_tf32 ? "tf32" : "fp32", dtype_flag.c_str(), options.fused_stats ? "true" : "false", absl::GetFlag(FLAGS_prefetch) ? "true" : "false", concurrent, total, concurrent == 1 ? total - sum.upload : total, flops / 1e12, sum.score, sum.mass_fit, sum.value_fit, sum.evaluate, sum.upload, sum.mass_solve, err, (long long)shape.tokens, (long long)RatioBudget(shape.tokens, absl::GetFlag(FLAGS_ratio)), static_cast<double>(iterations_sum) / (shape.heads * layers), iterations_max, not_converged);
  return 0;
}
