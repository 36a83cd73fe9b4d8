// Prometheus metrics of the service. Low-cardinality labels only (never layer, head or request).
#pragma once

#include <memory>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace kvcompact::server {

class Metrics {
  // First member: the references below point into families this registry owns.
  std::shared_ptr<prometheus::Registry> registry_;

 public:
  Metrics(const std::string& version, const std::string& backend);
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  void ObserveStage(const std::string& stage, double seconds);
  void CountError(const std::string& code);

  prometheus::Counter& request_bytes;
  prometheus::Counter& response_bytes;
  prometheus::Counter& chunks;
  prometheus::Counter& layers_ok;
  prometheus::Counter& layers_failed;
  prometheus::Counter& tokens_in;
  prometheus::Counter& tokens_out;
  prometheus::Counter& streams_started;
  prometheus::Gauge& streams_in_flight;
  prometheus::Gauge& queue_depth;
  prometheus::Histogram& layer_seconds;
  prometheus::Histogram& chunk_bytes;

 private:
  prometheus::Family<prometheus::Histogram>* stage_seconds_;
  prometheus::Family<prometheus::Counter>* errors_;
};

}  // namespace kvcompact::server
