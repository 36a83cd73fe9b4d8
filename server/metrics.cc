#include "server/metrics.h"

#include <dirent.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iterator>
#include <sstream>
#include <vector>

namespace kvcompact::server {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

const Histogram::BucketBoundaries kSecondsBuckets = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                     0.05,   0.1,   0.25,   0.5,   1,    2.5,
                                                     5,      10,    30,     60,    120};
const Histogram::BucketBoundaries kStreamSecondsBuckets = {0.01, 0.05, 0.1, 0.25, 0.5, 1,   2.5,
                                                           5,    10,   30,  60,   120, 300, 900};
const Histogram::BucketBoundaries kBytesBuckets = {1 << 10, 1 << 14, 1 << 16, 1 << 18, 1 << 20,
                                                   1 << 22, 1 << 24, 1 << 26};
const Histogram::BucketBoundaries kLayerBytesBuckets = {1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24,
                                                        1 << 26, 1 << 28, 1 << 30, 1ull << 32};
const Histogram::BucketBoundaries kTokenBuckets = {256, 512, 1024, 2048, 4096, 8192, 16384, 32768,
                                                   65536, 131072, 262144, 524288, 1048576};
const Histogram::BucketBoundaries kErrorBuckets = {0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1};

prometheus::Gauge& Gauge(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return BuildGauge().Name(name).Help(help).Register(r).Add({});
}

}  // namespace

Metrics::Metrics(const std::string& version, const std::string& backend)
    : registry_(std::make_shared<prometheus::Registry>()),
      request_bytes(BuildCounter().Name("kvcompact_request_bytes_total").Help("Tensor payload bytes received").Register(*registry_).Add({})),
      response_bytes(BuildCounter().Name("kvcompact_response_bytes_total").Help("Tensor payload bytes sent").Register(*registry_).Add({})),
      chunks(BuildCounter().Name("kvcompact_chunks_total").Help("KV and query chunks received").Register(*registry_).Add({})),
      layers_ok(BuildCounter().Name("kvcompact_layers_total").Help("Layers compacted, by result").Register(*registry_).Add({{"result", "ok"}})),
      layers_failed(BuildCounter().Name("kvcompact_layers_total").Help("Layers compacted, by result").Register(*registry_).Add({{"result", "error"}})),
      tokens_in(BuildCounter().Name("kvcompact_tokens_in_total").Help("Cached tokens received (summed over heads)").Register(*registry_).Add({})),
      tokens_out(BuildCounter().Name("kvcompact_tokens_out_total").Help("Compacted entries returned (summed over heads)").Register(*registry_).Add({})),
      streams_started(BuildCounter().Name("kvcompact_streams_total").Help("Compact streams opened").Register(*registry_).Add({})),
      fallback_heads(BuildCounter().Name("kvcompact_fallback_heads_total").Help("Heads whose fit was not finite or beyond the output dtype's range and fell back to plain selection").Register(*registry_).Add({})),
      backend_fallback(BuildGauge().Name("kvcompact_backend_fallback").Help("1 when --backend=auto found no usable CUDA device and runs on the CPU backend").Register(*registry_).Add({})),
      streams_in_flight(Gauge(*registry_, "kvcompact_streams_in_flight", "Compact streams open now")),
      queue_depth(Gauge(*registry_, "kvcompact_queue_depth", "Layers waiting for the worker")),
      serving(Gauge(*registry_, "kvcompact_serving", "1 while the health service reports SERVING, else 0")),
      host_memory_reserved(Gauge(*registry_, "kvcompact_host_memory_reserved_bytes", "Host memory admitted to layers in flight (estimate)")),
      host_memory_limit(Gauge(*registry_, "kvcompact_host_memory_limit_bytes", "Admission bound on host memory of layers in flight")),
      gpu_memory_reserved(Gauge(*registry_, "kvcompact_gpu_memory_reserved_bytes", "Device memory held by the backend's buffers")),
      gpu_memory_peak(Gauge(*registry_, "kvcompact_gpu_memory_peak_bytes", "Most device memory the backend has held")),
      layer_seconds(BuildHistogram().Name("kvcompact_layer_seconds").Help("Worker time per layer").Register(*registry_).Add({}, kSecondsBuckets)),
      layer_tokens(BuildHistogram().Name("kvcompact_layer_tokens").Help("Tokens T per KV head of each compacted layer").Register(*registry_).Add({}, kTokenBuckets)),
      layer_input_bytes(BuildHistogram().Name("kvcompact_layer_input_bytes").Help("Payload bytes received per layer").Register(*registry_).Add({}, kLayerBytesBuckets)),
      output_error(BuildHistogram().Name("kvcompact_output_rel_error").Help("Held-out relative attention-output error per head").Register(*registry_).Add({}, kErrorBuckets)),
      chunk_bytes(BuildHistogram().Name("kvcompact_chunk_bytes").Help("Payload bytes per received chunk").Register(*registry_).Add({}, kBytesBuckets)),
      stage_seconds_(&BuildHistogram().Name("kvcompact_stage_seconds").Help("Time per compaction stage and layer").Register(*registry_)),
      errors_(&BuildCounter().Name("kvcompact_errors_total").Help("Errors returned (streams, layers, calls), by gRPC status code").Register(*registry_)),
      streams_finished_(&BuildCounter().Name("kvcompact_streams_finished_total").Help("Compact streams ended, by gRPC status code").Register(*registry_)),
      stream_seconds_(&BuildHistogram().Name("kvcompact_stream_seconds").Help("Duration of Compact streams").Register(*registry_).Add({}, kStreamSecondsBuckets)),
      resident_bytes_(&Gauge(*registry_, "process_resident_memory_bytes", "Resident memory size in bytes")),
      virtual_bytes_(&Gauge(*registry_, "process_virtual_memory_bytes", "Virtual memory size in bytes")),
      cpu_seconds_(&BuildCounter().Name("process_cpu_seconds_total").Help("User and system CPU time spent in seconds").Register(*registry_).Add({})),
      open_fds_(&Gauge(*registry_, "process_open_fds", "Open file descriptors")),
      threads_(&Gauge(*registry_, "process_threads", "OS threads of the process")),
      start_time_(&Gauge(*registry_, "process_start_time_seconds", "Start time of the process since the epoch in seconds")) {
  BuildGauge().Name("kvcompact_build_info").Help("Version and backend of this binary").Register(*registry_)
      .Add({{"version", version}, {"backend", backend}}).Set(1);
  start_time_->Set(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count());
  // Every code a stream can end with, at 0, so that rate() works from the first failure on.
  for (const char* code : {"OK", "CANCELLED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED",
                           "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"}) {
    streams_finished_->Add({{"code", code}});
  }
  UpdateProcess();
}

void Metrics::ObserveStage(const std::string& stage, double seconds) {
  stage_seconds_->Add({{"stage", stage}}, kSecondsBuckets).Observe(seconds);
}

void Metrics::CountError(const std::string& code) { errors_->Add({{"code", code}}).Increment(); }

void Metrics::StreamFinished(const std::string& code, double seconds) {
  streams_finished_->Add({{"code", code}}).Increment();
  stream_seconds_->Observe(seconds);
}

void Metrics::UpdateProcess() {
  // /proc/self/stat fields 14-15 (utime, stime, clock ticks), 20 (threads), 23 (vsize), 24 (rss pages).
  std::ifstream in("/proc/self/stat");
  std::string line;
  std::getline(in, line);
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return;
  std::istringstream fields(line.substr(close + 2));
  std::vector<std::string> f{std::istream_iterator<std::string>(fields), {}};
  if (f.size() < 22) return;  // f[0] is field 3
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  const double cpu = (std::stod(f[11]) + std::stod(f[12])) / ticks;
  if (cpu > cpu_seconds_->Value()) cpu_seconds_->Increment(cpu - cpu_seconds_->Value());
  threads_->Set(std::stod(f[17]));
  virtual_bytes_->Set(std::stod(f[20]));
  resident_bytes_->Set(std::stod(f[21]) * static_cast<double>(sysconf(_SC_PAGE_SIZE)));
  int fds = 0;
  if (DIR* dir = opendir("/proc/self/fd")) {
    while (readdir(dir) != nullptr) ++fds;
    closedir(dir);
    fds -= 3;  // ".", ".." and the directory's own descriptor
  }
  open_fds_->Set(fds);
}

}  // namespace kvcompact::server
