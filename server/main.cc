// kvcompact-server: the gRPC KV-cache compaction service.
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <memory>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_join.h"
#include "core/layer.h"
#include "server/flags.h"
#include "server/metrics_http.h"
#include "server/self_test.h"
#include "server/service.h"
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

std::unique_ptr<Backend> MakeBackend(const std::string& name, int threads, std::string* error) {
  if (name == "cpu") return MakeCpuBackend(threads);
#ifdef KVCOMPACT_WITH_CUDA
  if (name == "cuda" || name == "auto") {
    kernels::CudaBackendOptions options;
    options.device = absl::GetFlag(FLAGS_cuda_device);
    options.allow_tf32 = absl::GetFlag(FLAGS_allow_tf32);
    options.workspace_bytes = absl::GetFlag(FLAGS_cuda_workspace_bytes);
    options.memory_limit_bytes = absl::GetFlag(FLAGS_cuda_memory_limit_bytes);
    auto cuda = kernels::MakeCudaBackend(options);
    if (cuda.ok()) {
      spdlog::info("CUDA backend on device {}; math: {}", options.device,
                   options.allow_tf32 ? "TF32 tensor cores allowed" : "fp32 (no TF32)");
      return *std::move(cuda);
    }
    if (name == "cuda") {
      *error = "backend cuda: " + cuda.status().ToString();
      return nullptr;
    }
    spdlog::info("no usable CUDA device ({}); using the CPU backend", std::string(cuda.status().message()));
  }
#endif
  if (name == "auto") return MakeCpuBackend(threads);
  *error = "unknown or unavailable backend '" + name + "' (built in: " + absl::StrJoin(BuiltInBackends(), ", ") + ")";
  return nullptr;
}

// Blocks until SIGTERM or SIGINT. The signals are blocked in every thread (set before any thread
// starts), so sigwait is the only place they arrive.
int WaitForSignal(const sigset_t& set) {
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

bool WarmUp(Worker& worker) {
  v1::SelfTestRequest request;
  request.set_tokens(512);
  request.set_queries(512);
  request.set_heads(1);
  request.set_ratio(8);
  request.set_seed(1);
  request.add_methods(v1::METHOD_AM_HIGHEST_ATTENTION);
  request.add_methods(v1::METHOD_H2O);
  bool ok = false;
  worker.RunBlocking([&](Backend* backend) {
    if (!backend) return;
    auto result = RunSelfTest(*backend, *NormalizeSelfTest(request));
    if (!result.ok()) {
      spdlog::error("warm-up self-test failed: {}", result.status().ToString());
      return;
    }
    const float am = result->results(0).output_rel_error(), h2o = result->results(1).output_rel_error();
    spdlog::info("warm-up self-test: held-out output error am={:.4f} h2o={:.4f}", am, h2o);
    ok = am < h2o && am < 0.5f;  // the backend must actually compact, and better than eviction
  });
  return ok;
}

int Run(int argc, char** argv) {
  absl::SetProgramUsageMessage("kvcompact-server: KV-cache compaction by Attention Matching over gRPC");
  if (std::string err = ApplyEnvironmentToFlags(); !err.empty()) {
    fprintf(stderr, "bad environment: %s\n", err.c_str());
    return 2;
  }
  absl::ParseCommandLine(argc, argv);
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
  std::unique_ptr<Backend> backend = MakeBackend(absl::GetFlag(FLAGS_backend), threads, &error);
  if (!backend) {
    spdlog::critical("{}", error);
    return 2;
  }
  const std::string backend_name(backend->name());

  Metrics metrics(kVersion, backend_name);
  std::unique_ptr<MetricsHttpServer> metrics_http;
  if (!absl::GetFlag(FLAGS_metrics_listen).empty()) {
    auto started = MetricsHttpServer::Start(absl::GetFlag(FLAGS_metrics_listen), metrics.registry());
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
  ProfileRegistry profiles;
  if (absl::Status s = profiles.LoadDir(absl::GetFlag(FLAGS_profiles_dir)); absl::IsNotFound(s)) {
    spdlog::warn("{}: no budget profiles loaded", std::string(s.message()));
  } else if (!s.ok()) {
    spdlog::critical("budget profiles: {}", std::string(s.message()));
    return 2;
  }
  if (!profiles.names().empty()) spdlog::info("budget profiles: {}", absl::StrJoin(profiles.names(), ", "));
  context.profiles = &profiles;
  context.version = kVersion;
  context.backends = BuiltInBackends();
  context.threads = threads;
  // A backend that can no longer work (sticky CUDA error) turns health NOT_SERVING and stops the
  // process with exit code 1 so that the orchestrator restarts it.
  std::atomic<bool> backend_failed{false};
  Worker worker(std::move(backend), context.limits.worker_queue_depth, &metrics, [&backend_failed] {
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
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(static_cast<int>(context.limits.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(context.limits.max_message_bytes));
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    spdlog::critical("cannot listen on {}", absl::GetFlag(FLAGS_listen));
    return 2;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(false);  // not ready until the warm-up passed
  health->SetServingStatus(kServiceName, false);
  spdlog::info("listening on {} (port {}), backend {}, {} threads", absl::GetFlag(FLAGS_listen), port,
               backend_name, threads);

  if (absl::GetFlag(FLAGS_warmup) && !WarmUp(worker)) {
    spdlog::critical("warm-up self-test failed; exiting so that the orchestrator restarts the pod");
    server->Shutdown();
    return 1;
  }
  health->SetServingStatus(true);
  health->SetServingStatus(kServiceName, true);
  spdlog::info("SERVING");

  const int sig = WaitForSignal(signals);
  spdlog::info("signal {}: draining (NOT_SERVING, {} s for in-flight streams)", sig,
               absl::GetFlag(FLAGS_shutdown_timeout_seconds));
  health->SetServingStatus(false);
  health->SetServingStatus(kServiceName, false);
  // A second signal during the drain exits at once.
  std::thread([signals] {
    WaitForSignal(signals);
    spdlog::warn("second signal: exiting now");
    std::_Exit(1);
  }).detach();
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(1000 * absl::GetFlag(FLAGS_shutdown_timeout_seconds)));
  server->Shutdown(deadline);
  server->Wait();
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
