#include "server/metrics.h"

namespace kvcompact::server {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

const Histogram::BucketBoundaries kSecondsBuckets = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                     0.05,   0.1,   0.25,   0.5,   1,    2.5,
                                                     5,      10,    30,     60,    120};
const Histogram::BucketBoundaries kBytesBuckets = {1 << 10, 1 << 14, 1 << 16, 1 << 18, 1 << 20,
                                                   1 << 22, 1 << 24, 1 << 26};

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
      streams_in_flight(BuildGauge().Name("kvcompact_streams_in_flight").Help("Compact streams open now").Register(*registry_).Add({})),
      queue_depth(BuildGauge().Name("kvcompact_queue_depth").Help("Layers waiting for the worker").Register(*registry_).Add({})),
      layer_seconds(BuildHistogram().Name("kvcompact_layer_seconds").Help("Worker time per layer").Register(*registry_).Add({}, kSecondsBuckets)),
      chunk_bytes(BuildHistogram().Name("kvcompact_chunk_bytes").Help("Payload bytes per received chunk").Register(*registry_).Add({}, kBytesBuckets)),
      stage_seconds_(&BuildHistogram().Name("kvcompact_stage_seconds").Help("Time per compaction stage and layer").Register(*registry_)),
      errors_(&BuildCounter().Name("kvcompact_errors_total").Help("Errors returned, by gRPC status code").Register(*registry_)) {
  BuildGauge().Name("kvcompact_build_info").Help("Version and backend of this binary").Register(*registry_)
      .Add({{"version", version}, {"backend", backend}}).Set(1);
}

void Metrics::ObserveStage(const std::string& stage, double seconds) {
  stage_seconds_->Add({{"stage", stage}}, kSecondsBuckets).Observe(seconds);
}

void Metrics::CountError(const std::string& code) { errors_->Add({{"code", code}}).Increment(); }

}  // namespace kvcompact::server
