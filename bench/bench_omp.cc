// OMP key selection on one head, CPU reference (core/): held-out error and time of highest-attention
// AM and the OMP variants on a generated head (or a backend's whole layer with --backend=cuda in
// a build with CUDA). Prints a table; the last line is JSON.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <tuple>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/budget.h"
#include "core/layer.h"
#include "core/omp.h"
#include "core/synthetic.h"
#ifdef KVCOMPACT_WITH_CUDA
#include "kernels/cuda_backend.h"
#endif

ABSL_FLAG(uint32_t, tokens, 8192, "T per head");
ABSL_FLAG(uint32_t, queries, 2048, "reference queries per head");
ABSL_FLAG(uint32_t, head_dim, 128, "d");
ABSL_FLAG(uint32_t, heads, 2, "KV heads in the layer");
ABSL_FLAG(double, ratio, 50, "T / t");
ABSL_FLAG(std::string, variants, "am,omp,omp_fast,omp_progressive", "what to run");
ABSL_FLAG(std::string, backend, "cpu", "cpu or cuda");
ABSL_FLAG(int, threads, 0, "CPU backend threads (0 = all cores)");
ABSL_FLAG(double, beta_min, 0, "bounds on log w (both 0: the method's)");
ABSL_FLAG(double, beta_max, 0, "");
ABSL_FLAG(int64_t, omp_candidates, 0, "OMP pool (0: default)");
ABSL_FLAG(int64_t, loop_pool, 0, "> 0: time only the greedy loop (core/omp.h) on a generated Gram system of this pool size");

namespace {

// The greedy loop alone, as the CUDA backend runs it on a host thread per head: a Gram system from
// 512 generated mass rows of a pool of `pool` keys, t = pool / 4.
int LoopOnly(int64_t pool) {
  using namespace kvcompact;
  std::mt19937_64 rng(1);
  std::exponential_distribution<double> e(1.0);
  MatrixD phi(512, pool);
  for (Eigen::Index i = 0; i < phi.size(); ++i) phi.data()[i] = std::pow(e(rng), 3.0) * 1e-2;
  const MatrixD gram = phi.transpose() * phi;
  const VectorD rhs = phi.transpose() * VectorD(phi.rowwise().sum() * 0.9);
  const MatrixF gram_f32 = gram.cast<float>();
  printf("%-20s %-8s %-8s %-8s %-8s\n", "variant", "steps", "refits", "inside", "time_s");
  const std::vector<std::string> wanted = absl::StrSplit(absl::GetFlag(FLAGS_variants), ',');
  for (auto [name, k, interval, progressive] : {std::tuple{"omp", 1, 1, 0.0}, {"omp_fast", 4, 2, 0.0}, {"omp_progressive", 4, 1, 0.1}}) {
    if (std::find(wanted.begin(), wanted.end(), name) == wanted.end()) continue;
    OmpParams p;
    p.budget = pool / 4;
    p.keys_per_step = k;
    p.refit_interval = interval;
    p.progressive = progressive;
    for (bool f32 : {false, true}) {  // the CPU backend's float64 Gram, the CUDA backend's fp32 one
      const auto start = std::chrono::steady_clock::now();
      const OmpResult r = f32 ? SelectOmp(ConstMatrixMapF(gram_f32.data(), pool, pool), rhs, p) : SelectOmp(gram, rhs, p);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      printf("%-20s %-8d %-8d %-8d %-8.3f\n", (std::string(name) + (f32 ? " f32" : " f64")).c_str(), r.steps, r.refits,
             r.unconstrained_refits, secs);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace kvcompact;
  if (absl::GetFlag(FLAGS_loop_pool) > 0) return LoopOnly(absl::GetFlag(FLAGS_loop_pool));
  SyntheticShape shape;
  shape.heads = absl::GetFlag(FLAGS_heads);
  shape.tokens = absl::GetFlag(FLAGS_tokens);
  shape.queries = absl::GetFlag(FLAGS_queries);
  shape.head_dim = shape.value_dim = absl::GetFlag(FLAGS_head_dim);
  LayerJob job;
  job.data = MakeSyntheticLayer(shape, 5);
  const int64_t t = RatioBudget(shape.tokens, absl::GetFlag(FLAGS_ratio));
  job.budgets.assign(shape.heads, t);
  job.options.holdout_fraction = 0.1;
  if (absl::GetFlag(FLAGS_beta_min) != 0 || absl::GetFlag(FLAGS_beta_max) != 0) {
    job.options.beta_min = absl::GetFlag(FLAGS_beta_min);
    job.options.beta_max = absl::GetFlag(FLAGS_beta_max);
  }
  job.options.omp_pool = absl::GetFlag(FLAGS_omp_candidates);

  std::unique_ptr<Backend> backend;
  if (absl::GetFlag(FLAGS_backend) == "cuda") {
#ifdef KVCOMPACT_WITH_CUDA
    auto made = kernels::MakeCudaBackend({});
    if (!made.ok()) {
      fprintf(stderr, "%s\n", made.status().ToString().c_str());
      return 1;
    }
    backend = *std::move(made);
#else
    fprintf(stderr, "built without CUDA\n");
    return 1;
#endif
  } else {
    backend = MakeCpuBackend(absl::GetFlag(FLAGS_threads));
  }
  printf("backend %s, %ld heads, T=%ld, n=%ld, d=%ld, t=%ld\n", std::string(backend->name()).c_str(), (long)shape.heads,
         (long)shape.tokens, (long)shape.queries, (long)shape.head_dim, (long)t);
  printf("%-16s %-10s %-10s %-8s\n", "variant", "out_err", "mass_err", "time_s");
  std::string json = "{";
  for (const std::string& v : std::vector<std::string>(absl::StrSplit(absl::GetFlag(FLAGS_variants), ','))) {
    if (v != "am" && v != "omp" && v != "omp_fast" && v != "omp_progressive") {
      fprintf(stderr, "unknown variant %s\n", v.c_str());
      return 2;
    }
    LayerJob run = job;
    run.options.method = v == "am" ? Method::kAmHighestAttention : v == "omp_fast" ? Method::kAmOmpFast : Method::kAmOmp;
    if (v == "omp_progressive") {
      run.options.omp_keys_per_step = 4;
      run.options.omp_progressive = 0.1;
    }
    const auto start = std::chrono::steady_clock::now();
    auto r = backend->CompactLayer(run);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!r.ok()) {
      fprintf(stderr, "%s: %s\n", v.c_str(), r.status().ToString().c_str());
      return 1;
    }
    double err = 0, mass = 0;
    for (const CompactedHead& h : r->heads) err += h.quality.output_rel_error / shape.heads, mass += h.quality.mass_rel_error / shape.heads;
    printf("%-16s %-10.4f %-10.4f %-8.3f\n", v.c_str(), err, mass, secs);
    json += absl::StrCat(json.size() > 1 ? ", " : "", "\"", v, "\": {\"out_err\": ", err, ", \"mass_err\": ", mass,
                         ", \"seconds\": ", secs, "}");
  }
  printf("%s}\n", json.c_str());
  return 0;
}
