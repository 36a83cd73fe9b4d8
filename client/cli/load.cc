// `kvcompact load`: N concurrent Compact calls against a server for a duration, each call one
// generated cache of the given geometry. Prints progress every --report_every seconds and a final
// summary: calls and layers per second, payload throughput, call-latency percentiles, failed calls
// by status, and (with --metrics) the server's resident memory over the run. With --faults a share
// of the calls are faults (cancel, deadline, malformed, oversize) that must end in their status.
// Exit 0 only when every normal call succeeded, every fault ended as it must and health is SERVING.
#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <regex>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "client/cli/commands.h"

namespace kvcompact::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct ServerMemory {
  double resident = -1, reserved = -1;  // process RSS; admitted to layers in flight
};

// Resident memory and admission reservations from the server's /metrics (host:port); -1 if unknown.
ServerMemory ServerMemoryNow(const std::string& address) {
  std::vector<std::string> parts = absl::StrSplit(address, ':');
  if (parts.size() != 2) return {};
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(parts[0].c_str(), parts[1].c_str(), &hints, &res) != 0) return {};
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  std::string response;
  if (connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
    const std::string request = "GET /metrics HTTP/1.0\r\nHost: " + parts[0] + "\r\n\r\n";
    if (write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
      char buf[8192];
      for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) response.append(buf, static_cast<size_t>(n));
    }
  }
  close(fd);
  freeaddrinfo(res);
  ServerMemory memory;
  for (auto [name, value] : {std::pair{"process_resident_memory_bytes", &memory.resident},
                             std::pair{"kvcompact_host_memory_reserved_bytes", &memory.reserved}}) {
    std::smatch m;
    const std::regex re("\n" + std::string(name) + " ([0-9.e+]+)");
    if (!std::regex_search(response, m, re) || !absl::SimpleAtod(std::string(m[1]), value)) *value = -1;
  }
  return memory;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(std::ceil(p * v.size())) - (p > 0 ? 1 : 0));
  return v[i];
}

// Faults a load run can mix in (--faults): each replaces a normal call and must end in its status.
enum class Fault { kCancel, kDeadline, kMalformed, kOversize };
constexpr Fault kFaults[] = {Fault::kCancel, Fault::kDeadline, Fault::kMalformed, Fault::kOversize};

const char* FaultName(Fault f) {
  switch (f) {
    case Fault::kCancel: return "cancel mid-stream -> CANCELLED";
    case Fault::kDeadline: return "layer half-sent past a 50 ms deadline -> DEADLINE_EXCEEDED";
    case Fault::kMalformed: return "truncated K/V block -> LayerError INVALID_ARGUMENT, other layers done";
    case Fault::kOversize: return "message over the server limit -> RESOURCE_EXHAUSTED";
  }
  return "";
}

// Runs one fault call; true when it ended as it must.
bool RunFault(Fault fault, const Settings& s, const client::ClientOptions& options, const v1::StreamHeader& header,
              const std::vector<client::LayerInput>& layers, uint64_t server_max_message) {
  if (fault == Fault::kCancel) {
    client::Canceller canceller;
    auto outcome = client::Client(s.server, options).Compact(header, layers, [&](const client::CompactedLayer&) { canceller.Cancel(); }, &canceller);
    return !outcome.ok() && outcome.status().code() == absl::StatusCode::kCancelled;
  }
  // Raw streams: what a broken client would send. The deadline fault stalls with a layer
  // half-sent until its 50 ms deadline has passed.
  const client::Client raw(s.server, options);
  auto stub = v1::KVCompact::NewStub(raw.MakeChannel(0));
  grpc::ClientContext ctx;
  raw.Prepare(&ctx, fault == Fault::kDeadline ? 0.05 : 600);
  auto stream = stub->Compact(&ctx);
  v1::CompactRequest first;
  *first.mutable_header() = header;
  stream->Write(first);
  if (fault == Fault::kDeadline) {
    stream->Write(client::ChunkLayer(layers.front(), options.max_message_bytes).front());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  } else if (fault == Fault::kMalformed) {
    for (const client::LayerInput& layer : layers) {
      std::vector<v1::CompactRequest> chunks = client::ChunkLayer(layer, options.max_message_bytes);
      if (layer.layer == layers.front().layer) {
        std::string* data = chunks.front().mutable_kv()->mutable_keys()->mutable_data();
        data->resize(data->size() - 2);
      }
      for (const v1::CompactRequest& c : chunks) stream->Write(c);
    }
  } else {
    v1::CompactRequest big = client::ChunkLayer(layers.front(), ~uint64_t{0}).front();
    big.mutable_kv()->mutable_keys()->mutable_data()->append(server_max_message + 1024, '\0');
    stream->Write(big);
  }
  stream->WritesDone();
  v1::CompactResponse response;
  int done = 0, invalid = 0, other_errors = 0;
  while (stream->Read(&response)) {
    done += response.has_layer_done();
    if (response.has_layer_error()) {
      (response.layer_error().code() == static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT) ? invalid : other_errors)++;
    }
  }
  const grpc::Status status = stream->Finish();
  if (fault == Fault::kOversize) return status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED;
  if (fault == Fault::kDeadline) return status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
  return status.ok() && invalid == 1 && other_errors == 0 && done == static_cast<int>(layers.size()) - 1;
}

struct Tally {
  std::mutex mu;
  std::vector<double> latencies;            // seconds per successful call
  std::map<std::string, uint64_t> failures;  // by status code name
  std::map<std::string, std::string> first_message;  // by status code name
  uint64_t calls_ok = 0, layers = 0, layer_errors = 0;
  std::map<Fault, std::pair<uint64_t, uint64_t>> faults;  // kind -> (as expected, not as expected)
  double bytes_in = 0, bytes_out = 0;
};

}  // namespace

int RunLoad(const Settings& s) {
  absl::StatusOr<client::ClientOptions> options = ConnectionOptions(s);
  if (!options.ok()) {
    fprintf(stderr, "error: %s\n", options.status().ToString().c_str());
    return 2;
  }
  options->max_message_bytes = s.max_message_bytes;
  absl::StatusOr<client::CacheInput> cache = GeneratedCache(s);
  if (!cache.ok()) {
    fprintf(stderr, "error: %s\n", cache.status().ToString().c_str());
    return 2;
  }
  Settings header_settings = s;
  if (header_settings.request_id.empty()) header_settings.request_id = "load";
  absl::StatusOr<v1::StreamHeader> header = HeaderFor(header_settings, *cache);
  if (!header.ok() || s.concurrency < 1 || s.duration <= 0) {
    fprintf(stderr, "error: %s\n", header.ok() ? "--concurrency >= 1 and --duration > 0" : header.status().ToString().c_str());
    return 2;
  }
  printf("load: %d concurrent calls for %.0f s against %s; each call %u layers x %u KV heads x T=%u, n=%u, d=%u (%s), %s at %.0fx\n",
         s.concurrency, s.duration, s.server.c_str(), s.layers, s.kv_heads, s.context, s.queries, s.head_dim,
         s.dtype.c_str(), s.method.c_str(), s.ratio);
  uint64_t server_max_message = 16u << 20;
  if (s.faults > 0) {
    auto info = client::Client(s.server, *options).GetServerInfo(10);
    if (!info.ok()) {
      fprintf(stderr, "error: GetServerInfo: %s\n", info.status().ToString().c_str());
      return 1;
    }
    server_max_message = info->limits().max_message_bytes();
    printf("faults: %.0f%% of calls are one of: cancel mid-stream, stall past a deadline, truncated block, oversize message\n",
           100 * s.faults);
  }
  const double rss_start = s.metrics.empty() ? -1 : ServerMemoryNow(s.metrics).resident;
  Tally tally;
  std::atomic<bool> stop{false};
  const auto start = Clock::now();
  auto worker = [&](int index) {
    client::Client client(s.server, *options);
    uint64_t round = 0, fault_count = 0;
    std::mt19937_64 rng(s.seed * 1000 + index);
    std::uniform_real_distribution<double> unit(0, 1);
    while (!stop.load()) {
      v1::StreamHeader h = *header;
      h.set_request_id("load/" + std::to_string(index) + "/" + std::to_string(round++));
      if (s.faults > 0 && unit(rng) < s.faults) {
        const Fault fault = kFaults[(index + fault_count++) % 4];
        const bool expected = RunFault(fault, s, *options, h, cache->layers, server_max_message);
        std::lock_guard<std::mutex> lock(tally.mu);
        ++(expected ? tally.faults[fault].first : tally.faults[fault].second);
        continue;
      }
      const auto t0 = Clock::now();
      absl::StatusOr<client::CompactOutcome> outcome = client.Compact(h, cache->layers);
      const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      if (!outcome.ok()) {
        {
          std::lock_guard<std::mutex> lock(tally.mu);
          const std::string code = absl::StatusCodeToString(outcome.status().code());
          if (tally.failures[code]++ == 0) tally.first_message[code] = std::string(outcome.status().message());
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));  // back off as a real client would
        continue;
      }
      std::lock_guard<std::mutex> lock(tally.mu);
      ++tally.calls_ok;
      tally.latencies.push_back(seconds);
      tally.layers += outcome->layers.size();
      tally.layer_errors += outcome->errors.size();
      tally.bytes_in += static_cast<double>(outcome->summary.bytes_in());
      tally.bytes_out += static_cast<double>(outcome->summary.bytes_out());
    }
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < s.concurrency; ++i) threads.emplace_back(worker, i);

  double rss_max = rss_start, rss_last = rss_start, reserved_last = -1;
  std::vector<std::pair<double, double>> rss_samples;  // (elapsed, bytes)
  if (rss_start > 0) rss_samples.emplace_back(0, rss_start);
  printf("%8s %10s %8s %10s %10s %9s %9s %13s %13s\n", "elapsed", "calls_ok", "failed", "layers/s", "MB/s in", "p50_s",
         "p99_s", "server_rss_MB", "in_flight_MB");
  for (double next = s.report_every;; next += s.report_every) {
    const double until = std::min(next, s.duration);
    std::this_thread::sleep_until(start + std::chrono::milliseconds(static_cast<int64_t>(until * 1000)));
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    if (!s.metrics.empty()) {
      const ServerMemory memory = ServerMemoryNow(s.metrics);
      rss_last = memory.resident;
      reserved_last = memory.reserved;
      rss_max = std::max(rss_max, rss_last);
      rss_samples.emplace_back(elapsed, rss_last);
    }
    std::lock_guard<std::mutex> lock(tally.mu);
    uint64_t failed = 0;
    for (const auto& [code, n] : tally.failures) failed += n;
    printf("%8.0f %10lu %8lu %10.1f %10.1f %9.3f %9.3f %13.1f %13.1f\n", elapsed, tally.calls_ok, failed,
           tally.layers / elapsed, tally.bytes_in / elapsed / 1e6, Percentile(tally.latencies, 0.5),
           Percentile(tally.latencies, 0.99), rss_last / 1e6, reserved_last / 1e6);
    fflush(stdout);
    if (until >= s.duration) break;
  }
  stop = true;
  for (std::thread& t : threads) t.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();

  uint64_t failed = 0;
  for (const auto& [code, n] : tally.failures) failed += n;
  printf("\nsummary: %lu calls ok, %lu failed, %lu layer errors in %.1f s (including the last calls' tails)\n",
         tally.calls_ok, failed, tally.layer_errors, elapsed);
  printf("  throughput: %.2f calls/s, %.1f layers/s, %.1f MB/s in, %.2f MB/s out\n", tally.calls_ok / elapsed,
         tally.layers / elapsed, tally.bytes_in / elapsed / 1e6, tally.bytes_out / elapsed / 1e6);
  printf("  call latency (s): p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n", Percentile(tally.latencies, 0.5),
         Percentile(tally.latencies, 0.9), Percentile(tally.latencies, 0.99), Percentile(tally.latencies, 1.0));
  for (const auto& [code, n] : tally.failures) {
    printf("  failed calls %s: %lu (first: %s)\n", code.c_str(), n, tally.first_message[code].c_str());
  }
  uint64_t unexpected = 0;
  for (const auto& [fault, counts] : tally.faults) {
    printf("  fault %-72s %6lu as expected, %lu not\n", FaultName(fault), counts.first, counts.second);
    unexpected += counts.second;
  }
  auto serving = client::Client(s.server, *options).IsServing("", 10);
  printf("  server health after the run: %s\n",
         serving.ok() ? (*serving ? "SERVING" : "NOT_SERVING") : serving.status().ToString().c_str());
  if (rss_samples.size() >= 2) {
    // Growth is measured from the first sample after warm-up (10% into the run) to the end.
    const double warm_at = 0.1 * s.duration;
    double warm = rss_samples.back().second;
    for (const auto& [t, bytes] : rss_samples) {
      if (t >= warm_at) {
        warm = bytes;
        break;
      }
    }
    printf("  server RSS (MB): start %.1f, after warm-up %.1f, end %.1f, max %.1f; growth after warm-up %+.1f%%\n",
           rss_start / 1e6, warm / 1e6, rss_last / 1e6, rss_max / 1e6, 100.0 * (rss_last - warm) / warm);
  }
  return failed == 0 && tally.layer_errors == 0 && unexpected == 0 && serving.ok() && *serving ? 0 : 1;
}

}  // namespace kvcompact::cli
