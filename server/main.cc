// kvcompact-server: the gRPC KV-cache compaction service.
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>
#include <spdlog/spdlog.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/strings/ascii.h"
#include "core/layer.h"
#include "server/flags.h"
#include "server/memory_budget.h"
#include "server/metrics_http.h"
#include "server/security.h"
#include "server/self_test.h"
#include "server/service.h"
#include "server/limits.h"
#include "server/stream_watchdog.h"
#include "server/version.h"
#ifdef KVCOMPACT_WITH_CUDA
#include "kernels/cuda_backend.h"
#endif

namespace kvcompact::server {
namespace {

constexpr char kServiceName[] = "kvcompact.v1.KVCompact";

std::vector<std::string> BuiltInBackends() {
#ifdef KVCOMPACT_WITH_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

// --profiles_dir, else found from the binary's own location (never a path of the build machine):
// <prefix>/bin/kvcompact-server -> <prefix>/share/kvcompact/profiles; build/server/kvcompact-server
// -> the repository's profiles/.
std::string ProfilesDir() {
  if (!absl::GetFlag(FLAGS_profiles_dir).empty()) return absl::GetFlag(FLAGS_profiles_dir);
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "profiles";
  const std::filesystem::path bin = exe.parent_path();
  for (const std::filesystem::path& candidate : {bin.parent_path() / "share" / "kvcompact" / "profiles",
                                                 bin.parent_path().parent_path() / "profiles"}) {
    if (std::filesystem::is_directory(candidate, ec)) return candidate.string();
  }
  return (bin.parent_path() / "share" / "kvcompact" / "profiles").string();
}

// The worker's backends (one per layer in flight); `fell_back`: set when "auto" wanted CUDA
// (built in) and got the CPU backend.
std::vector<std::unique_ptr<Backend>> MakeBackends(const std::string& name, int threads, std::string* error,
                                                   bool* fell_back) {
  std::vector<std::unique_ptr<Backend>> out;
  if (name == "cpu") {
    out.push_back(MakeCpuBackend(threads));
    return out;
  }
#ifdef KVCOMPACT_WITH_CUDA
  if (name == "cuda" || name == "auto") {
    kernels::CudaBackendOptions options;
    options.device = absl::GetFlag(FLAGS_cuda_device);
    options.allow_tf32 = absl::GetFlag(FLAGS_allow_tf32);
    options.workspace_bytes = absl::GetFlag(FLAGS_cuda_workspace_bytes);
    options.memory_limit_bytes = absl::GetFlag(FLAGS_cuda_memory_limit_bytes);
    options.head_lanes = static_cast<int>(absl::GetFlag(FLAGS_cuda_head_lanes));
    const int lanes = static_cast<int>(absl::GetFlag(FLAGS_cuda_layers_in_flight));
    auto cuda = kernels::MakeCudaBackends(options, lanes);
    if (cuda.ok()) {
      spdlog::info("CUDA backend on device {}, {} layer(s) in flight; math: {}", options.device, lanes,
                   options.allow_tf32 ? "TF32 tensor cores allowed" : "fp32 (no TF32)");
      return *std::move(cuda);
    }
    if (name == "cuda") {
      *error = "backend cuda: " + cuda.status().ToString();
      return out;
    }
    spdlog::warn("--backend=auto: no usable CUDA device ({}); running on the CPU backend "
                 "(kvcompact_backend_fallback = 1; --backend=cuda makes this a start failure)",
                 std::string(cuda.status().message()));
    *fell_back = true;
  }
#endif
  if (name == "auto") {
    out.push_back(MakeCpuBackend(threads));
    return out;
  }
  *error = "unknown or unavailable backend '" + name + "' (built in: " + absl::StrJoin(BuiltInBackends(), ", ") + ")";
  return out;
}

// Blocks until SIGTERM or SIGINT. The signals are blocked in every thread (set before any thread
// starts), so sigwait is the only place they arrive.
int WaitForSignal(const sigset_t& set) {
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

int Millis(double seconds) { return static_cast<int>(std::clamp(seconds * 1000.0, 0.0, 2e9)); }

// After the shutdown timeout, the time the worker gets to stop at its next head or chunk.
constexpr double kExitMarginSeconds = 5;

// Gives freed heap back to the system. A burst of calls (an HTTP/2 rapid reset: gRPC 1.51 queues
// every reset stream as a call) leaves gigabytes freed but resident; glibc returns only the top
// of each arena on its own. Every 5 s, when over 64 MiB are free in the heap, trim it.
void TrimFreedHeap() {
  for (;;) {
    std::this_thread::sleep_for(std::chrono::seconds(5));
    const struct mallinfo2 info = mallinfo2();
    if (info.fordblks > (size_t{64} << 20)) {
      malloc_trim(0);
      spdlog::debug("returned freed heap to the system ({} MiB were free)", info.fordblks >> 20);
    }
  }
}

// Flags whose values the code relies on being in range; "" or what is wrong.
std::string CheckFlagBounds() {
  if (absl::GetFlag(FLAGS_max_message_bytes) < 4096 || absl::GetFlag(FLAGS_max_message_bytes) > INT32_MAX) {
    return "--max_message_bytes must be in [4096, 2^31 - 1]";
  }
  if (absl::GetFlag(FLAGS_max_tokens_per_block) == 0 || absl::GetFlag(FLAGS_max_tokens_per_block) > kMaxRowsPerLayer) {
    return "--max_tokens_per_block must be in [1, 2^31 - 1]";
  }
  if (absl::GetFlag(FLAGS_max_queries_per_layer) == 0 || absl::GetFlag(FLAGS_max_queries_per_layer) > kMaxRowsPerLayer) {
    return "--max_queries_per_layer must be in [1, 2^31 - 1]";
  }
  for (double v : {absl::GetFlag(FLAGS_idle_timeout_seconds), absl::GetFlag(FLAGS_layer_receive_timeout_seconds),
                   absl::GetFlag(FLAGS_drain_delay_seconds), absl::GetFlag(FLAGS_shutdown_timeout_seconds)}) {
    if (!(v >= 0 && v <= 1e6)) return "timeouts and delays must be in [0, 1e6] seconds";
  }
  if (absl::GetFlag(FLAGS_cuda_layers_in_flight) < 1 || absl::GetFlag(FLAGS_cuda_layers_in_flight) > 16) {
    return "--cuda_layers_in_flight must be in [1, 16]";
  }
  if (absl::GetFlag(FLAGS_cuda_head_lanes) < 1 || absl::GetFlag(FLAGS_cuda_head_lanes) > 16) {
    return "--cuda_head_lanes must be in [1, 16]";
  }
  return "";
}

// Keepalive and connection-age settings of the listening port(s).
void ApplyConnectionFlags(grpc::ServerBuilder& builder) {
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, Millis(absl::GetFlag(FLAGS_keepalive_time_seconds)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, Millis(absl::GetFlag(FLAGS_keepalive_timeout_seconds)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             Millis(absl::GetFlag(FLAGS_keepalive_min_client_interval_seconds)));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             static_cast<int>(std::max(1u, absl::GetFlag(FLAGS_max_streams_per_connection))));
  if (absl::GetFlag(FLAGS_max_connection_idle_seconds) > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, Millis(absl::GetFlag(FLAGS_max_connection_idle_seconds)));
  }
  if (absl::GetFlag(FLAGS_max_connection_age_seconds) > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, Millis(absl::GetFlag(FLAGS_max_connection_age_seconds)));
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                               Millis(absl::GetFlag(FLAGS_max_connection_age_grace_seconds)));
  }
}

// Linking gRPC's reflection library registers its plugin with every ServerBuilder; the
// health-only port drops it so that it serves health and nothing else.
class WithoutReflection final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [](const auto& p) { return p->name() == "proto_server_reflection"; }),
                   plugins->end());
  }
};

// Every method but health on the health-only port: UNIMPLEMENTED. (Also what gives that server
// the callback completion queue the health service runs on.)
class HealthOnly final : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    class Refuse final : public grpc::ServerGenericBidiReactor {
     public:
      Refuse() { Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "this port serves grpc.health.v1 only")); }
      void OnDone() override { delete this; }
    };
    return new Refuse;
  }
};

bool WarmUp(Worker& worker) {
  v1::SelfTestRequest request;
  request.set_tokens(512);
  request.set_queries(512);
  request.set_heads(1);
  request.set_ratio(8);
  request.set_seed(1);
  request.add_methods(v1::METHOD_AM_HIGHEST_ATTENTION);
  request.add_methods(v1::METHOD_H2O);
  bool ok = true;
  for (int lane = 0; lane < worker.lanes(); ++lane) {  // every backend loads its kernels before the first stream
    bool lane_ok = false;
    worker.RunBlocking(
        [&](Backend* backend) {
          if (!backend) return;
          auto result = RunSelfTest(*backend, *NormalizeSelfTest(request));
          if (!result.ok()) {
            spdlog::error("warm-up self-test failed: {}", result.status().ToString());
            return;
          }
          const float am = result->results(0).output_rel_error(), h2o = result->results(1).output_rel_error();
          spdlog::info("warm-up self-test: held-out output error am={:.4f} h2o={:.4f}", am, h2o);
          lane_ok = am < h2o && am < 0.5f;  // the backend must actually compact, and better than eviction
        },
        lane);
    ok = ok && lane_ok;
  }
  return ok;
}

int Run(int argc, char** argv) {
  // glibc gives each thread that allocates its own arena (up to 8 per core); with multi-megabyte
  // layers passing through many gRPC threads, freed memory stays spread over the arenas and the
  // resident size creeps up (+14% in 8 minutes on a 16-core machine). Four arenas keep it flat at
  // 3% less throughput (docs/RELIABILITY.md). MALLOC_ARENA_MAX in the environment still wins.
  if (std::getenv("MALLOC_ARENA_MAX") == nullptr) mallopt(M_ARENA_MAX, 4);
  absl::SetProgramUsageMessage("kvcompact-server: KV-cache compaction by Attention Matching over gRPC");
  if (std::string err = ApplyEnvironmentToFlags(); !err.empty()) {
    fprintf(stderr, "bad environment: %s\n", err.c_str());
    return 2;
  }
  absl::ParseCommandLine(argc, argv);
  if (std::string err = CheckFlagBounds(); !err.empty()) {
    fprintf(stderr, "bad flag: %s\n", err.c_str());
    return 2;
  }
  spdlog::set_level(spdlog::level::from_str(absl::GetFlag(FLAGS_log_level)));
  spdlog::info("kvcompact-server {} starting: {}", kVersion, absl::StrJoin(EffectiveFlags(), " "));

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  const int threads = absl::GetFlag(FLAGS_threads) > 0 ? absl::GetFlag(FLAGS_threads)
                                                      : static_cast<int>(std::thread::hardware_concurrency());
  std::string error;
  bool fell_back = false;
  std::vector<std::unique_ptr<Backend>> backends = MakeBackends(absl::GetFlag(FLAGS_backend), threads, &error, &fell_back);
  if (backends.empty()) {
    spdlog::critical("{}", error);
    return 2;
  }
  const std::string backend_name(backends[0]->name());

  Metrics metrics(kVersion, backend_name);
  metrics.backend_fallback.Set(fell_back ? 1 : 0);
  std::unique_ptr<MetricsHttpServer> metrics_http;
  if (!absl::GetFlag(FLAGS_metrics_listen).empty()) {
    auto started = MetricsHttpServer::Start(absl::GetFlag(FLAGS_metrics_listen), metrics.registry(),
                                            [&metrics] { metrics.UpdateProcess(); });
    if (!started.ok()) {
      spdlog::critical("cannot serve metrics: {}", started.status().ToString());
      return 2;
    }
    metrics_http = *std::move(started);
    spdlog::info("metrics on {} (port {})", absl::GetFlag(FLAGS_metrics_listen), metrics_http->port());
  }

  ServiceContext context;
  context.limits.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  context.limits.max_tokens_per_block = absl::GetFlag(FLAGS_max_tokens_per_block);
  context.limits.max_queries_per_layer = absl::GetFlag(FLAGS_max_queries_per_layer);
  context.limits.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  context.limits.max_open_layers_per_stream = absl::GetFlag(FLAGS_max_open_layers_per_stream);
  context.limits.worker_queue_depth = std::max(1u, absl::GetFlag(FLAGS_queue_depth));
  context.limits.idle_timeout_seconds = absl::GetFlag(FLAGS_idle_timeout_seconds);
  context.limits.layer_receive_timeout_seconds = absl::GetFlag(FLAGS_layer_receive_timeout_seconds);
  StreamWatchdog watchdog;
  std::thread(TrimFreedHeap).detach();
  context.watchdog = &watchdog;
  const uint64_t host_memory = absl::GetFlag(FLAGS_max_host_memory_bytes) > 0 ? absl::GetFlag(FLAGS_max_host_memory_bytes)
                                                                             : DefaultHostMemoryLimit();
  MemoryBudget memory(host_memory, [&metrics](uint64_t bytes) { metrics.host_memory_reserved.Set(static_cast<double>(bytes)); });
  metrics.host_memory_limit.Set(static_cast<double>(host_memory));
  context.memory = &memory;
  const uint64_t pool_bytes = absl::GetFlag(FLAGS_host_buffer_pool_bytes) > 0 ? absl::GetFlag(FLAGS_host_buffer_pool_bytes)
                                                                               : std::min<uint64_t>(host_memory / 10, uint64_t{4} << 30);
  HostBufferPool buffers(pool_bytes);
  context.buffers = &buffers;
  context.limits.max_host_memory_bytes = host_memory;
  ProfileRegistry profiles;
  if (absl::Status s = profiles.LoadDir(ProfilesDir()); absl::IsNotFound(s)) {
    spdlog::warn("{}: no budget profiles loaded", std::string(s.message()));
  } else if (!s.ok()) {
    spdlog::critical("budget profiles: {}", std::string(s.message()));
    return 2;
  }
  if (!profiles.names().empty()) spdlog::info("budget profiles: {}", absl::StrJoin(profiles.names(), ", "));
  context.profiles = &profiles;
  auto credentials = MakeServerCredentials({absl::GetFlag(FLAGS_tls_cert_file), absl::GetFlag(FLAGS_tls_key_file),
                                            absl::GetFlag(FLAGS_tls_client_ca_file)});
  if (!credentials.ok()) {
    spdlog::critical("TLS: {}", std::string(credentials.status().message()));
    return 2;
  }
  const char* env_tokens = std::getenv("KVCOMPACT_AUTH_TOKEN");
  auto auth = TokenAuthenticator::Load(absl::GetFlag(FLAGS_auth_token_file), env_tokens ? env_tokens : "");
  if (!auth.ok()) {
    spdlog::critical("auth: {}", std::string(auth.status().message()));
    return 2;
  }
  context.auth = &*auth;
  std::vector<std::string> allowed_names = absl::StrSplit(absl::GetFlag(FLAGS_tls_client_allowed_names), ',', absl::SkipWhitespace());
  for (std::string& name : allowed_names) name = std::string(absl::StripAsciiWhitespace(name));
  if (!allowed_names.empty() && absl::GetFlag(FLAGS_tls_client_ca_file).empty()) {
    spdlog::critical("TLS: --tls_client_allowed_names needs mutual TLS (--tls_client_ca_file)");
    return 2;
  }
  const ClientIdentityFilter identities(allowed_names);
  context.identities = &identities;
  spdlog::info("transport {}; {}",
               absl::GetFlag(FLAGS_tls_cert_file).empty() ? "plaintext"
               : absl::GetFlag(FLAGS_tls_client_ca_file).empty() ? "TLS"
               : allowed_names.empty() ? "mutual TLS"
                                       : absl::StrCat("mutual TLS (clients: ", absl::StrJoin(allowed_names, ", "), ")"),
               auth->enabled() ? absl::StrCat("bearer tokens required (", auth->token_count(), " accepted)")
                               : std::string("no token required"));
  context.version = kVersion;
  context.backends = BuiltInBackends();
  context.threads = threads;
  // A backend that can no longer work (sticky CUDA error) turns health NOT_SERVING and stops the
  // process with exit code 1 so that the orchestrator restarts it.
  std::atomic<bool> backend_failed{false};
  Worker worker(std::move(backends), context.limits.worker_queue_depth, &metrics, [&backend_failed] {
    spdlog::critical("backend unhealthy (sticky device error): shutting down for a restart");
    backend_failed = true;
    kill(getpid(), SIGTERM);
  });
  context.worker = &worker;
  context.metrics = &metrics;
  KVCompactService service(&context);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), *credentials, &port);
  // No SO_REUSEPORT: a second server on a port in use must fail to start, not share the port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  ApplyConnectionFlags(builder);
  builder.SetMaxReceiveMessageSize(static_cast<int>(context.limits.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(context.limits.max_message_bytes));
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    spdlog::critical("cannot listen on {}", absl::GetFlag(FLAGS_listen));
    return 2;
  }
  // Probes reach health without TLS or token on --health_listen: a server with only that service.
  std::unique_ptr<grpc::Server> health_server;
  HealthOnly health_only;
  if (!absl::GetFlag(FLAGS_health_listen).empty()) {
    grpc::ServerBuilder health_builder;
    health_builder.SetOption(std::make_unique<WithoutReflection>());
    health_builder.RegisterCallbackGenericService(&health_only);
    int health_port = 0;
    ApplyConnectionFlags(health_builder);
    health_builder.AddListeningPort(absl::GetFlag(FLAGS_health_listen), grpc::InsecureServerCredentials(), &health_port);
    health_builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    health_server = health_builder.BuildAndStart();
    if (!health_server || health_port == 0) {
      spdlog::critical("cannot listen on {}", absl::GetFlag(FLAGS_health_listen));
      return 2;
    }
    spdlog::info("health on {} (port {})", absl::GetFlag(FLAGS_health_listen), health_port);
  }
  auto set_serving = [&](bool serving) {
    for (grpc::Server* s : {server.get(), health_server.get()}) {
      if (s == nullptr) continue;
      s->GetHealthCheckService()->SetServingStatus(serving);
      s->GetHealthCheckService()->SetServingStatus(kServiceName, serving);
    }
    metrics.serving.Set(serving ? 1 : 0);
  };
  set_serving(false);  // not ready until the warm-up passed
  spdlog::info("listening on {} (port {}), backend {}, {} threads", absl::GetFlag(FLAGS_listen), port,
               backend_name, threads);

  if (absl::GetFlag(FLAGS_warmup) && !WarmUp(worker)) {
    spdlog::critical("warm-up self-test failed; exiting so that the orchestrator restarts the pod");
    server->Shutdown();
    return 1;
  }
  set_serving(true);
  spdlog::info("SERVING");

  const int sig = WaitForSignal(signals);
  const double drain_delay = absl::GetFlag(FLAGS_drain_delay_seconds);
  spdlog::info("signal {}: draining (NOT_SERVING; {} s drain delay, then {} s for in-flight streams)", sig,
               drain_delay, absl::GetFlag(FLAGS_shutdown_timeout_seconds));
  set_serving(false);
  // A second signal during the drain exits at once.
  std::thread([signals] {
    WaitForSignal(signals);
    spdlog::warn("second signal: exiting now");
    std::_Exit(1);
  }).detach();
  // Whatever is still running (a head of a huge layer, a stuck device call), the process ends
  // within the drain delay + shutdown timeout + a margin.
  const double exit_bound = drain_delay + absl::GetFlag(FLAGS_shutdown_timeout_seconds) + kExitMarginSeconds;
  std::thread([exit_bound] {
    std::this_thread::sleep_for(std::chrono::milliseconds(Millis(exit_bound)));
    spdlog::error("shutdown did not complete within {} s; exiting", exit_bound);
    std::_Exit(1);
  }).detach();
  // Load balancers see NOT_SERVING (or the endpoint removed) within this delay; new calls are
  // still served meanwhile, so none is refused in the gap.
  if (drain_delay > 0) std::this_thread::sleep_for(std::chrono::milliseconds(Millis(drain_delay)));
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(1000 * absl::GetFlag(FLAGS_shutdown_timeout_seconds)));
  server->Shutdown(deadline);
  server->Wait();
  if (health_server) health_server->Shutdown(std::chrono::system_clock::now());
  worker.Stop();
  if (backend_failed) {
    spdlog::critical("stopped after a backend failure");
    return 1;
  }
  spdlog::info("stopped cleanly");
  return 0;
}

}  // namespace
}  // namespace kvcompact::server

int main(int argc, char** argv) { return kvcompact::server::Run(argc, argv); }
