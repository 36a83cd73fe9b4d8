#include "server/flags.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/match.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "gRPC listen address");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9464", "Prometheus /metrics address; empty disables");
ABSL_FLAG(std::string, health_listen, "",
          "Extra plaintext address serving only grpc.health.v1 (for probes when --listen uses TLS); empty: none");
ABSL_FLAG(std::string, tls_cert_file, "", "Server certificate chain (PEM); set with --tls_key_file to serve TLS");
ABSL_FLAG(std::string, tls_key_file, "", "Private key of --tls_cert_file (PEM)");
ABSL_FLAG(std::string, tls_client_ca_file, "", "CA (PEM) that signs client certificates; set: mutual TLS is required");
ABSL_FLAG(std::string, tls_client_allowed_names, "",
          "With --tls_client_ca_file: comma-separated client identities (a subject alternative name or the common "
          "name of the client certificate) allowed to call kvcompact.v1; others get PERMISSION_DENIED. Empty: any "
          "certificate the CA signed");
ABSL_FLAG(std::string, auth_token_file, "",
          "Bearer tokens, one per line, required on kvcompact.v1 calls (health stays open). Without it the "
          "environment variable KVCOMPACT_AUTH_TOKEN is read the same way; neither set: no token needed");
ABSL_FLAG(double, keepalive_time_seconds, 60, "Server pings an idle connection after this long");
ABSL_FLAG(double, keepalive_timeout_seconds, 20, "A ping unanswered this long closes the connection");
ABSL_FLAG(double, keepalive_min_client_interval_seconds, 10,
          "Clients may ping this often (more often gets GOAWAY too_many_pings)");
ABSL_FLAG(double, max_connection_idle_seconds, 0, "Close connections idle this long; 0: never");
ABSL_FLAG(double, max_connection_age_seconds, 0,
          "Ask clients to reconnect after this long (rebalances over replicas); 0: never");
ABSL_FLAG(double, max_connection_age_grace_seconds, 300, "Time streams get to finish after max_connection_age");
ABSL_FLAG(std::string, backend, "auto", "Compute backend: auto (cuda when built in and a device is usable, else cpu), cpu, cuda");
ABSL_FLAG(int, cuda_device, 0, "CUDA device ordinal");
ABSL_FLAG(bool, allow_tf32, false, "Tensor-core math for the attention statistics (faster, less exact): cuBLAS TF32 for fp32 inputs, fused 16-bit kernels for inputs sent in bf16 or fp16");
ABSL_FLAG(uint64_t, cuda_workspace_bytes, uint64_t{2} << 30, "GPU memory bound for the logit chunk of one layer");
ABSL_FLAG(uint64_t, cuda_memory_limit_bytes, 0,
          "Bound on the CUDA backend's GPU memory; larger layers are compacted in groups of heads. 0 = 90% of the memory free at start-up");
ABSL_FLAG(uint32_t, cuda_layers_in_flight, 3,
          "Layers the CUDA backend compacts at once on the device, each on its own thread, streams and share of "
          "--cuda_memory_limit_bytes (one layer's solver steps are latency-bound; others fill the device meanwhile); 1-16");
ABSL_FLAG(uint32_t, cuda_head_lanes, 1,
          "Streams (each with its own cuBLAS/cuSOLVER handles and one KV head's buffers) over which a layer's value fits "
          "and evaluations are spread on the CUDA backend, so the heads' Cholesky factorisations overlap; 1-16");
ABSL_FLAG(int, threads, 0, "CPU threads for the CPU backend; 0 = all cores");
ABSL_FLAG(uint64_t, max_message_bytes, 16u << 20, "Largest gRPC message accepted and sent");
ABSL_FLAG(uint64_t, max_tokens_per_block, 1u << 20, "Largest T of one layer's block");
ABSL_FLAG(uint64_t, max_queries_per_layer, 1u << 18, "Largest reference-query count per KV head");
ABSL_FLAG(uint64_t, max_host_memory_bytes, 0,
          "Host memory admitted to layers in flight (estimate per layer); over it a layer gets RESOURCE_EXHAUSTED. "
          "0 = 70% of the container's memory limit (or of RAM)");
ABSL_FLAG(uint64_t, host_buffer_pool_bytes, 0,
          "Idle layer buffers kept for reuse (a fresh multi-GB allocation faults its pages in at about 2 GB/s); "
          "0 = 10% of the host-memory budget, at most 4 GiB");
ABSL_FLAG(uint32_t, max_concurrent_streams, 64, "Compact streams served at once; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(uint32_t, max_open_layers_per_stream, 4, "Layers one stream may have half-sent at once");
ABSL_FLAG(double, idle_timeout_seconds, 60,
          "A stream with nothing queued or running that sends nothing this long ends DEADLINE_EXCEEDED; a half-sent "
          "layer with no chunk this long fails DEADLINE_EXCEEDED; a response unread this long cancels the stream. 0: none");
ABSL_FLAG(double, layer_receive_timeout_seconds, 600,
          "A layer must be complete (LayerEnd) this long after its first chunk, else it fails DEADLINE_EXCEEDED. 0: none");
ABSL_FLAG(uint32_t, max_streams_per_connection, 100,
          "HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS)");
ABSL_FLAG(uint32_t, queue_depth, 4, "Layers waiting for the worker before streams stop reading");
ABSL_FLAG(double, drain_delay_seconds, 0,
          "On SIGTERM: keep serving (health NOT_SERVING) this long so load balancers stop routing here first");
ABSL_FLAG(double, shutdown_timeout_seconds, 10, "After the drain delay: time in-flight streams get to finish");
ABSL_FLAG(bool, warmup, true, "Run a self-test before reporting SERVING");
ABSL_FLAG(std::string, profiles_dir, "",
          "Budget profiles (*.json, BudgetProfile) for Allocation.profile; a missing directory loads none. "
          "Empty: share/kvcompact/profiles beside the binary's folder (an installed server), else the "
          "repository's profiles/ when the binary runs from its build tree");
ABSL_FLAG(std::string, log_level, "info", "spdlog level: trace, debug, info, warn, error");

namespace kvcompact::server {
namespace {

// The flags defined in this file, by name: every one of them is mirrored by the environment and
// logged, with no list to keep in step.
std::vector<absl::CommandLineFlag*> ServerFlags() {
  std::vector<absl::CommandLineFlag*> out;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (absl::EndsWith(flag->Filename(), "server/flags.cc")) out.push_back(flag);
  }
  std::sort(out.begin(), out.end(), [](auto* a, auto* b) { return a->Name() < b->Name(); });
  return out;
}

std::string EnvName(const std::string& flag) {
  std::string env = "KVCOMPACT_";
  for (char c : flag) env += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return env;
}

}  // namespace

std::string ApplyEnvironmentToFlags() {
  for (absl::CommandLineFlag* flag : ServerFlags()) {
    const std::string env = EnvName(std::string(flag->Name()));
    const char* value = std::getenv(env.c_str());
    if (value == nullptr) continue;
    std::string error;
    if (!flag->ParseFrom(value, &error)) return env + ": " + error;
  }
  return "";
}

std::vector<std::string> EffectiveFlags() {
  std::vector<std::string> out;
  for (absl::CommandLineFlag* flag : ServerFlags()) out.push_back(std::string(flag->Name()) + "=" + flag->CurrentValue());
  return out;
}

}  // namespace kvcompact::server
