// Prometheus metrics of the service. Low-cardinality labels only (never layer, head or request).
// docs/operations.md lists every series and what to alert on.
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
  // A Compact stream ended with `code` after `seconds`.
  void StreamFinished(const std::string& code, double seconds);
  // Refreshes the process_* gauges from /proc (called before each scrape).
  void UpdateProcess();

  prometheus::Counter& request_bytes;
  prometheus::Counter& response_bytes;
  prometheus::Counter& chunks;
  prometheus::Counter& layers_ok;
  prometheus::Counter& layers_failed;
  prometheus::Counter& tokens_in;
  prometheus::Counter& tokens_out;
  prometheus::Counter& streams_started;
  prometheus::Counter& fallback_heads;        // fits replaced by selection (non-finite or out of range)
  prometheus::Gauge& backend_fallback;        // 1: --backend=auto found no usable CUDA device, runs on the CPU
  prometheus::Gauge& streams_in_flight;
  prometheus::Gauge& queue_depth;
  prometheus::Gauge& serving;                 // 1 while health says SERVING
  prometheus::Gauge& host_memory_reserved;    // admission control: bytes held by layers in flight
  prometheus::Gauge& host_memory_limit;
  prometheus::Gauge& gpu_memory_reserved;     // backend buffers on the device
  prometheus::Gauge& gpu_memory_peak;
  prometheus::Histogram& layer_seconds;
  prometheus::Histogram& layer_tokens;        // T of each compacted layer (block size)
  prometheus::Histogram& layer_input_bytes;   // K/V/query payload of each layer as received
  prometheus::Histogram& output_error;        // held-out relative output error per head
  prometheus::Histogram& chunk_bytes;

 private:
  prometheus::Family<prometheus::Histogram>* stage_seconds_;
  prometheus::Family<prometheus::Counter>* errors_;
  prometheus::Family<prometheus::Counter>* streams_finished_;
  prometheus::Histogram* stream_seconds_;
  prometheus::Gauge* resident_bytes_;
  prometheus::Gauge* virtual_bytes_;
  prometheus::Counter* cpu_seconds_;
  prometheus::Gauge* open_fds_;
  prometheus::Gauge* threads_;
  prometheus::Gauge* start_time_;
};

}  // namespace kvcompact::server
