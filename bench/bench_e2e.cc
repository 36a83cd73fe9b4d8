// BENCH-C: end-to-end wall time of one context's compaction through a running kvcompact-server,
// from the first byte sent to the last result received (client library, loopback gRPC).
// Default geometry: SmolLM2-135M (30 layers x 3 KV heads x d=64), T=4096, 2048 queries per KV
// head, 20x, AM highest attention. Prints a table and, last, one JSON line.
//   bench_e2e --server=127.0.0.1:50051 [--layers --kv_heads --head_dim --tokens --queries --ratio
//             --method --dtype --streams --repeats]
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "client/client.h"
#include "core/method.h"
#include "core/synthetic.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "server address");
ABSL_FLAG(uint32_t, layers, 30, "layers");
ABSL_FLAG(uint32_t, kv_heads, 3, "KV heads");
ABSL_FLAG(uint32_t, head_dim, 64, "head dim");
ABSL_FLAG(uint32_t, tokens, 4096, "T per layer");
ABSL_FLAG(uint32_t, queries, 2048, "reference queries per KV head");
ABSL_FLAG(double, ratio, 20, "compaction ratio");
ABSL_FLAG(std::string, method, "am", "method name");
ABSL_FLAG(std::string, dtype, "f32", "wire dtype: f32, bf16");
ABSL_FLAG(int, streams, 1, "parallel streams");
ABSL_FLAG(int, repeats, 3, "timed runs (after one warm-up run)");
ABSL_FLAG(uint32_t, distinct, 0, "generate only this many distinct layers and reuse them (0: all distinct)");
ABSL_FLAG(bool, sink, false, "also time the same bytes sent to the Sink RPC and print the ratio (BENCH-B)");
ABSL_FLAG(std::string, name, "BENCH-C", "benchmark name in the output");

namespace {

std::string CpuName() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace kvcompact;
  const auto method = MethodFromName(absl::GetFlag(FLAGS_method));
  if (!method) {
    fprintf(stderr, "unknown method\n");
    return 2;
  }
  const DType wire = absl::GetFlag(FLAGS_dtype) == "bf16" ? DType::kBFloat16 : DType::kFloat32;
  SyntheticShape shape;
  shape.heads = absl::GetFlag(FLAGS_kv_heads);
  shape.tokens = absl::GetFlag(FLAGS_tokens);
  shape.queries = absl::GetFlag(FLAGS_queries);
  shape.head_dim = shape.value_dim = absl::GetFlag(FLAGS_head_dim);
  std::vector<client::LayerInput> layers;
  const uint32_t distinct = absl::GetFlag(FLAGS_distinct);
  for (uint32_t l = 0; l < absl::GetFlag(FLAGS_layers); ++l) {
    if (distinct > 0 && l >= distinct) {  // reuse the generated tensors (shared, not copied)
      client::LayerInput in = layers[l % distinct];
      in.layer = l;
      layers.push_back(std::move(in));
      continue;
    }
    const LayerData d = MakeSyntheticLayer(shape, 1, static_cast<int32_t>(l));
    layers.push_back(client::ToLayerInput(d, wire));
  }
  v1::StreamHeader header;
  header.set_request_id("bench_e2e");
  header.mutable_geometry()->set_num_layers(absl::GetFlag(FLAGS_layers));
  header.mutable_geometry()->set_num_kv_heads(shape.heads);
  header.mutable_geometry()->set_head_dim(shape.head_dim);
  header.mutable_options()->set_method(static_cast<v1::Method>(*method));
  header.mutable_options()->mutable_budget()->set_ratio(absl::GetFlag(FLAGS_ratio));
  header.mutable_options()->set_holdout_fraction(0.1f);

  client::ClientOptions options;
  options.streams = absl::GetFlag(FLAGS_streams);
  client::Client cl(absl::GetFlag(FLAGS_server), options);
  auto info = cl.GetServerInfo();
  if (!info.ok()) {
    fprintf(stderr, "server: %s\n", info.status().ToString().c_str());
    return 1;
  }
  std::vector<double> walls;
  double err = 0, score = 0, mass = 0, value = 0, eval = 0, decode = 0, queue = 0, worker = 0, bytes_in = 0;
  for (int r = 0; r <= absl::GetFlag(FLAGS_repeats); ++r) {
    auto outcome = cl.Compact(header, layers);
    if (!outcome.ok() || !outcome->errors.empty()) {
      fprintf(stderr, "compaction failed: %s\n", outcome.ok() ? outcome->errors[0].message().c_str() : outcome.status().ToString().c_str());
      return 1;
    }
    if (r == 0) continue;  // warm-up
    walls.push_back(outcome->wall_seconds);
    const v1::StageTimes& t = outcome->summary.times();
    score = t.score_seconds(), mass = t.mass_fit_seconds(), value = t.value_fit_seconds(), eval = t.evaluate_seconds();
    decode = t.decode_seconds(), queue = t.queue_seconds(), worker = t.total_seconds();
    bytes_in = static_cast<double>(outcome->summary.bytes_in());
    err = 0;
    int heads = 0;
    for (const auto& l : outcome->layers)
      for (const auto& h : l.done.heads()) err += h.output_rel_error(), ++heads;
    err /= heads;
  }
  std::sort(walls.begin(), walls.end());
  const double median = walls[walls.size() / 2];
  double sink_median = 0;
  if (absl::GetFlag(FLAGS_sink)) {
    std::vector<double> sink_walls;
    for (int r = 0; r <= absl::GetFlag(FLAGS_repeats); ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      auto sunk = cl.Sink(header, layers);
      if (!sunk.ok()) {
        fprintf(stderr, "sink: %s\n", sunk.status().ToString().c_str());
        return 1;
      }
      if (r > 0) sink_walls.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(sink_walls.begin(), sink_walls.end());
    sink_median = sink_walls[sink_walls.size() / 2];
  }
  auto after = cl.GetServerInfo();
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%d", std::gmtime(&now));
  const std::string name = absl::GetFlag(FLAGS_name);
  printf("%s  %s  cpu: %s (%u threads), backend %s, server threads %u\n",
         name.c_str(), date, CpuName().c_str(), std::thread::hardware_concurrency(), info->backend().c_str(),
         info->threads());
  printf("geometry: %u layers x %u KV heads x d=%u, T=%u, n=%u, %.0fx, method %s, wire %s, %d stream(s)\n",
         absl::GetFlag(FLAGS_layers), absl::GetFlag(FLAGS_kv_heads), absl::GetFlag(FLAGS_head_dim),
         absl::GetFlag(FLAGS_tokens), absl::GetFlag(FLAGS_queries), absl::GetFlag(FLAGS_ratio),
         absl::GetFlag(FLAGS_method).c_str(), absl::GetFlag(FLAGS_dtype).c_str(), options.streams);
  printf("%-8s %-10s\n", "run", "wall_s");
  for (size_t i = 0; i < walls.size(); ++i) printf("%-8zu %-10.3f\n", i + 1, walls[i]);
  printf("median wall %.3f s; %.1f MB sent; mean held-out output error %.4f\n", median, bytes_in / 1e6, err);
  if (sink_median > 0) {
    printf("sink (same bytes, no compute) median wall %.3f s; compact / sink = %.2f\n", sink_median, median / sink_median);
  }
  if (after.ok()) {
    printf("server GPU memory held by the backend: %.2f GiB now, %.2f GiB peak\n", after->device_bytes_reserved() / 1073741824.0,
           after->device_bytes_peak() / 1073741824.0);
  }
  printf("server stage seconds (last run, summed over layers): score %.2f, mass fit %.2f, value fit %.2f, evaluate %.2f\n",
         score, mass, value, eval);
  printf("server worker busy %.2f s; decode (wire to fp32, on the streams' threads) %.2f s; layers waiting in the queue %.2f s\n",
         worker, decode, queue);
  printf("{\"bench\":\"%s\",\"median_wall_s\":%.4f,\"sink_median_wall_s\":%.4f,\"runs\":%zu,\"mean_output_rel_error\":%.5f,"
         "\"bytes_in\":%.0f,\"device_bytes_peak\":%llu}\n",
         name.c_str(), median, sink_median, walls.size(), err, bytes_in,
         after.ok() ? static_cast<unsigned long long>(after->device_bytes_peak()) : 0ull);
  return 0;
}
