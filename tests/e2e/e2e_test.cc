// End to end: the real server binary on loopback, driven by the client library and the CLI.
#include <signal.h>

#include <cstring>
#include <regex>
#include <thread>

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>

#include "client/safetensors.h"
#include "tests/e2e/helpers.h"
#include "tests/e2e/server_process.h"

namespace kvcompact::testing {
namespace {

class E2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = new ServerProcess(); }
  static void TearDownTestSuite() { delete server_; }
  void SetUp() override { ASSERT_TRUE(server_->ok()) << server_->Log(); }
  static ServerProcess* server_;
};
ServerProcess* E2E::server_ = nullptr;

TEST_F(E2E, ClientLibraryCompactsRaggedBudgetsAndKeysAreCopies) {
  const auto layers = MakeLayers(3, 2, 512, 256);
  v1::StreamHeader header = Header(3, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 1);
  auto* per_head = header.mutable_options()->mutable_budget()->mutable_per_head();
  const std::vector<uint32_t> budgets = {10, 40, 25, 25, 64, 7};
  for (uint32_t b : budgets) per_head->add_tokens(b);
  client::Client cl(server_->address());
  int callbacks = 0;
  auto outcome = cl.Compact(header, ToInputs(layers), [&](const client::CompactedLayer&) { ++callbacks; });
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  EXPECT_EQ(callbacks, 3);
  ASSERT_EQ(outcome->layers.size(), 3u);
  EXPECT_TRUE(outcome->errors.empty());
  uint64_t total_t = 0;
  for (const client::CompactedLayer& layer : outcome->layers) {
    ASSERT_EQ(layer.heads.size(), 2u);
    for (int h = 0; h < 2; ++h) {
      const client::CompactedHead& head = layer.heads[h];
      const uint32_t want_t = budgets[layer.layer * 2 + h];
      ASSERT_EQ(head.tokens, want_t);
      ASSERT_EQ(head.beta.size(), want_t);
      ASSERT_EQ(head.indices.size(), want_t);
      ASSERT_EQ(head.keys.size(), want_t * 64 * 4);
      total_t += want_t;
      // C_k rows are exact copies of the sent keys at the reported indices.
      const LayerData& d = layers[layer.layer];
      for (uint32_t r = 0; r < want_t; ++r) {
        const float* sent = d.keys.data() + (h * d.tokens + head.indices[r]) * 64;
        ASSERT_EQ(std::memcmp(head.keys.data() + r * 64 * 4, sent, 64 * 4), 0);
      }
      const v1::HeadMetrics& m = layer.done.heads(h);
      EXPECT_TRUE(m.has_quality());
      EXPECT_EQ(m.tokens_in(), 512u);
      EXPECT_GT(m.eval_queries(), 0u);
      EXPECT_LT(m.output_rel_error(), 0.6f);
    }
  }
  EXPECT_EQ(outcome->summary.layers_done(), 3u);
  EXPECT_EQ(outcome->summary.tokens_out(), total_t);
  EXPECT_EQ(outcome->summary.tokens_in(), 3u * 2 * 512);
  EXPECT_GT(outcome->summary.bytes_in(), 3u * 2 * 512 * 64 * 4 * 2);
  // Device memory per layer: none on the CPU backend; on a GPU what the backend held after each
  // layer (buffers grow to the largest budget so far, never per layer).
  for (const client::CompactedLayer& layer : outcome->layers) {
    if (outcome->summary.backend() == "cpu") {
      EXPECT_EQ(layer.done.device_bytes(), 0u);
    } else {
      EXPECT_GT(layer.done.device_bytes(), 0u);
      EXPECT_LE(layer.done.device_bytes(), outcome->layers.back().done.device_bytes());
    }
  }
}

TEST_F(E2E, AmBeatsEvictionBaselinesThroughTheService) {
  const auto inputs = ToInputs(MakeLayers(2, 2, 1024, 512, 11));
  auto mean_error = [&](v1::Method method) {
    auto outcome = client::Client(server_->address()).Compact(Header(2, 2, 64, method, 20), inputs);
    EXPECT_TRUE(outcome.ok()) << outcome.status();
    double err = 0;
    for (const auto& l : outcome->layers)
      for (const auto& h : l.done.heads()) err += h.output_rel_error() / 4;
    return err;
  };
  const double am = mean_error(v1::METHOD_AM_HIGHEST_ATTENTION);
  const double h2o = mean_error(v1::METHOD_H2O);
  const double snapkv = mean_error(v1::METHOD_SNAPKV);
  EXPECT_LT(am, 0.8 * h2o) << "am " << am << " h2o " << h2o;
  EXPECT_LT(am, 0.8 * snapkv) << "am " << am << " snapkv " << snapkv;
}

TEST_F(E2E, ParallelStreamsGiveTheSameResultAsOne) {
  const auto inputs = ToInputs(MakeLayers(4, 2, 256, 128, 5));
  const v1::StreamHeader header = Header(4, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 8);
  client::ClientOptions one, three;
  three.streams = 3;
  three.max_message_bytes = 64 << 10;  // many chunks per layer
  auto a = client::Client(server_->address(), one).Compact(header, inputs);
  auto b = client::Client(server_->address(), three).Compact(header, inputs);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->layers.size(), 4u);
  ASSERT_EQ(b->layers.size(), 4u);
  for (size_t l = 0; l < 4; ++l) {
    for (size_t h = 0; h < 2; ++h) {
      EXPECT_EQ(a->layers[l].heads[h].indices, b->layers[l].heads[h].indices);
      EXPECT_EQ(a->layers[l].heads[h].beta, b->layers[l].heads[h].beta);
      EXPECT_EQ(a->layers[l].heads[h].values, b->layers[l].heads[h].values);
    }
  }
}

TEST_F(E2E, CancelMidStreamLeavesServerHealthy) {
  const auto inputs = ToInputs(MakeLayers(24, 2, 2048, 1024, 6));
  client::Canceller canceller;
  auto outcome = client::Client(server_->address())
                     .Compact(Header(24, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 20), inputs,
                              [&](const client::CompactedLayer&) { canceller.Cancel(); }, &canceller);
  ASSERT_FALSE(outcome.ok());
  EXPECT_EQ(outcome.status().code(), absl::StatusCode::kCancelled) << outcome.status();
  auto serving = client::Client(server_->address()).IsServing();
  ASSERT_TRUE(serving.ok() && *serving);
  auto again = client::Client(server_->address()).Compact(Header(1, 2, 64, v1::METHOD_H2O, 4), ToInputs(MakeLayers(1, 2, 128, 64)));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->layers.size(), 1u);
}

TEST_F(E2E, CliCompactsAFileAndWritesARaggedSafetensorsCache) {
  const std::string in = ::testing::TempDir() + "/cli_in.safetensors", out = ::testing::TempDir() + "/cli_out.safetensors";
  std::string log;
  ASSERT_EQ(RunCommand({CliBinary(), "generate", "--output=" + in, "--layers=3", "--kv_heads=2", "--context=512",
                        "--queries=256", "--dtype=bf16"}, &log), 0) << log;
  ASSERT_EQ(RunCommand({CliBinary(), "compact", "--server=" + server_->address(), "--input=" + in, "--output=" + out,
                        "--ratio=16", "--output_dtype=bf16"}, &log), 0) << log;
  EXPECT_NE(log.find("[3/3] layer"), std::string::npos) << log;  // progress
  EXPECT_NE(log.find("total: 3 layers ok, 0 failed"), std::string::npos) << log;
  auto file = client::ReadSafetensors(out);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata["format"], "kvcompact.compacted.v1");
  EXPECT_EQ(file->metadata["layers.2.tokens_in"], "512");
  const client::HostTensor& keys = file->tensors.at("layers.1.heads.1.keys");
  EXPECT_EQ(keys.dtype, DType::kBFloat16);
  EXPECT_EQ(keys.shape, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(file->tensors.at("layers.0.heads.0.beta").dtype, DType::kFloat32);
  EXPECT_EQ(file->int32_tensors.at("layers.0.heads.0.indices").size(), 32u);
  ASSERT_EQ(RunCommand({CliBinary(), "selftest", "--server=" + server_->address()}, &log), 0) << log;
  EXPECT_NE(log.find("am"), std::string::npos);
  ASSERT_EQ(RunCommand({CliBinary(), "info", "--server=" + server_->address()}, &log), 0) << log;
  EXPECT_NE(log.find("backend: \""), std::string::npos) << log;  // cpu here, cuda on a GPU machine
}

// The CLI's contract with scripts: --help exits 0 and lists the flags, usage errors exit 2 before
// any work, --json prints one JSON object.
TEST_F(E2E, CliHelpUsageErrorsAndJson) {
  std::string log;
  ASSERT_EQ(RunCommand({CliBinary(), "--help"}, &log), 0) << log;
  EXPECT_NE(log.find("--omp_candidates"), std::string::npos) << log;
  EXPECT_NE(log.find("exit status"), std::string::npos) << log;
  EXPECT_EQ(RunCommand({CliBinary(), "info", "--srever=" + server_->address()}, &log), 2) << log;
  EXPECT_NE(log.find("unknown flag --srever"), std::string::npos) << log;
  EXPECT_EQ(RunCommand({CliBinary(), "info", "--ratio=abc"}, &log), 2) << log;
  EXPECT_EQ(RunCommand({CliBinary(), "nonsense"}, &log), 2) << log;
  const std::string in = ::testing::TempDir() + "/cli_json_in.safetensors";
  ASSERT_EQ(RunCommand({CliBinary(), "generate", "--output=" + in, "--layers=2", "--kv_heads=2", "--context=256",
                        "--queries=128"}, &log), 0) << log;
  EXPECT_EQ(RunCommand({CliBinary(), "compact", "--server=" + server_->address(), "--input=" + in,
                        "--output=/nonexistent-kvcompact-dir/out.safetensors"}, &log), 2) << log;
  EXPECT_NE(log.find("does not exist"), std::string::npos) << log;

  const std::string out = ::testing::TempDir() + "/cli_json_out.safetensors";
  ASSERT_EQ(RunCommand({CliBinary(), "compact", "--server=" + server_->address(), "--input=" + in, "--output=" + out,
                        "--ratio=8", "--quiet", "--json"}, &log), 0) << log;
  google::protobuf::Struct parsed;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(log, &parsed).ok()) << log;
  const auto& fields = parsed.fields();
  EXPECT_EQ(fields.at("output").string_value(), out);
  EXPECT_GT(fields.at("file_bytes").number_value(), 0);
  ASSERT_EQ(fields.at("layers").list_value().values_size(), 2);
  EXPECT_EQ(fields.at("summary").struct_value().fields().at("layers_done").number_value(), 2);
  ASSERT_EQ(RunCommand({CliBinary(), "info", "--server=" + server_->address(), "--json"}, &log), 0) << log;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(log, &parsed).ok()) << log;
  EXPECT_FALSE(parsed.fields().at("backend").string_value().empty()) << log;
}

TEST_F(E2E, ClientKilledMidStreamLeavesServerHealthy) {
  const std::string in = ::testing::TempDir() + "/kill_in.safetensors";
  ASSERT_EQ(RunCommand({CliBinary(), "generate", "--output=" + in, "--layers=20", "--kv_heads=2", "--context=4096",
                        "--queries=1024"}, nullptr), 0);
  const pid_t pid = fork();
  if (pid == 0) {
    const std::string server = "--server=" + server_->address(), input = "--input=" + in;
    execl(CliBinary().c_str(), "kvcompact", "compact", server.c_str(), input.c_str(), "--output=/dev/null", "--quiet",
          static_cast<char*>(nullptr));
    _exit(127);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  auto serving = client::Client(server_->address()).IsServing();
  ASSERT_TRUE(serving.ok() && *serving);
  auto again = client::Client(server_->address()).Compact(Header(1, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 4),
                                                          ToInputs(MakeLayers(1, 2, 128, 64)));
  ASSERT_TRUE(again.ok()) << again.status();
}

TEST_F(E2E, SinkCountsTheSameMessagesCompactWouldRead) {
  const auto inputs = ToInputs(MakeLayers(2, 2, 256, 128));
  client::ClientOptions options;
  options.max_message_bytes = 64 << 10;
  auto summary = client::Client(server_->address(), options).Sink(Header(2, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 8), inputs);
  ASSERT_TRUE(summary.ok()) << summary.status();
  uint64_t messages = 1, bytes = 0;  // the header
  for (const auto& layer : inputs) {
    for (const auto& m : client::ChunkLayer(layer, 64 << 10)) {
      ++messages;
      bytes += m.ByteSizeLong();
    }
  }
  EXPECT_EQ(summary->messages(), messages);
  EXPECT_GT(summary->bytes(), bytes);  // + the header's bytes
}

TEST_F(E2E, MetricsEndpointReportsCompactions) {
  auto outcome = client::Client(server_->address()).Compact(Header(1, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 4),
                                                            ToInputs(MakeLayers(1, 2, 128, 64)));
  ASSERT_TRUE(outcome.ok());
  const std::string metrics = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_NE(metrics.find("kvcompact_layers_total{result=\"ok\"}"), std::string::npos) << metrics.substr(0, 500);
  EXPECT_NE(metrics.find("kvcompact_stage_seconds_bucket{stage=\"mass_fit\""), std::string::npos);
  EXPECT_NE(metrics.find("kvcompact_build_info{"), std::string::npos);
  EXPECT_NE(metrics.find("kvcompact_queue_depth"), std::string::npos);
  EXPECT_EQ(metrics.rfind("HTTP/1.0 200 OK", 0), 0u);
  EXPECT_EQ(HttpGet(server_->metrics_port(), "/other").rfind("HTTP/1.0 404", 0), 0u);
}

// SIGTERM with a stream in flight: the stream completes, health goes NOT_SERVING, exit code 0.
TEST(E2EShutdown, SigtermDrainsInFlightStreamAndExitsCleanly) {
  ServerProcess server({"--shutdown_timeout_seconds=30"});
  ASSERT_TRUE(server.ok()) << server.Log();
  const auto inputs = ToInputs(MakeLayers(8, 2, 1024, 512, 9));
  absl::StatusOr<client::CompactOutcome> outcome;
  std::thread stream([&] {
    outcome = client::Client(server.address()).Compact(Header(8, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 10), inputs,
                                                       [&](const client::CompactedLayer& l) {
                                                         if (l.layer == 0) server.Signal(SIGTERM);
                                                       });
  });
  stream.join();
  EXPECT_EQ(server.WaitForExit(30), 0) << server.Log();
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  EXPECT_EQ(outcome->layers.size(), 8u);
  EXPECT_NE(server.Log().find("draining"), std::string::npos);
  EXPECT_NE(server.Log().find("stopped cleanly"), std::string::npos);
}

}  // namespace
}  // namespace kvcompact::testing

namespace kvcompact::testing {
namespace {

TEST(E2EConfig, EnvironmentMirrorsFlagsAndCommandLineWins) {
  setenv("KVCOMPACT_MAX_CONCURRENT_STREAMS", "7", 1);
  setenv("KVCOMPACT_QUEUE_DEPTH", "9", 1);
  ServerProcess server({"--queue_depth=3"});
  unsetenv("KVCOMPACT_MAX_CONCURRENT_STREAMS");
  unsetenv("KVCOMPACT_QUEUE_DEPTH");
  ASSERT_TRUE(server.ok()) << server.Log();
  auto info = client::Client(server.address()).GetServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->limits().max_concurrent_streams(), 7u);
  EXPECT_EQ(info->limits().worker_queue_depth(), 3u);
  EXPECT_NE(server.Log().find("max_concurrent_streams=7"), std::string::npos) << "effective config is logged";
}

TEST(E2EConfig, LayersInFlightAreReportedAndBounded) {
  setenv("KVCOMPACT_CUDA_LAYERS_IN_FLIGHT", "2", 1);
  ServerProcess server(std::vector<std::string>{});
  unsetenv("KVCOMPACT_CUDA_LAYERS_IN_FLIGHT");
  ASSERT_TRUE(server.ok()) << server.Log();
  auto info = client::Client(server.address()).GetServerInfo();
  ASSERT_TRUE(info.ok());
  // The CUDA backend runs that many lanes; the CPU backend one (its threads share each layer).
  EXPECT_EQ(info->limits().layers_in_flight(), info->backend() == "cuda" ? 2u : 1u);
  for (const char* bad : {"--cuda_layers_in_flight=0", "--cuda_layers_in_flight=17"}) {
    std::string log;
    const int code = RunCommand({ServerBinary(), "--listen=127.0.0.1:0", "--metrics_listen=", bad}, &log);
    EXPECT_EQ(code, 2) << bad << ": " << log;
    EXPECT_NE(log.find("--cuda_layers_in_flight must be in [1, 16]"), std::string::npos) << log;
  }
  for (const char* bad : {"--cuda_head_lanes=0", "--cuda_head_lanes=17"}) {
    std::string log;
    const int code = RunCommand({ServerBinary(), "--listen=127.0.0.1:0", "--metrics_listen=", bad}, &log);
    EXPECT_EQ(code, 2) << bad << ": " << log;
    EXPECT_NE(log.find("--cuda_head_lanes must be in [1, 16]"), std::string::npos) << log;
  }
}

TEST(E2EConfig, BadEnvironmentValueExitsWithAClearMessage) {
  setenv("KVCOMPACT_THREADS", "many", 1);
  std::string log;
  const int code = RunCommand({ServerBinary(), "--listen=127.0.0.1:0", "--metrics_listen="}, &log);
  unsetenv("KVCOMPACT_THREADS");
  EXPECT_EQ(code, 2);
  EXPECT_NE(log.find("KVCOMPACT_THREADS"), std::string::npos) << log;
}

}  // namespace
}  // namespace kvcompact::testing

namespace kvcompact::testing {
namespace {

TEST(LoadTool, ConcurrentCallsWithFaultsAllEndAsTheyMust) {
  ServerProcess server;
  ASSERT_TRUE(server.ok()) << server.Log();
  std::string out;
  const int code = RunCommand({CliBinary(), "load", "--server=" + server.address(), "--concurrency=4", "--duration=3",
                               "--report_every=1", "--layers=2", "--kv_heads=2", "--context=256", "--queries=64",
                               "--ratio=8", "--faults=0.3", "--metrics=127.0.0.1:" + std::to_string(server.metrics_port())},
                              &out);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find(" 0 failed, 0 layer errors"), std::string::npos) << out;
  EXPECT_NE(out.find("call latency (s): p50"), std::string::npos) << out;
  EXPECT_NE(out.find("server health after the run: SERVING"), std::string::npos) << out;
  EXPECT_NE(out.find("server RSS (MB)"), std::string::npos) << out;
  for (const char* fault : {"fault cancel mid-stream", "fault layer half-sent past a 50 ms deadline", "fault truncated K/V block", "fault message over"}) {
    EXPECT_NE(out.find(fault), std::string::npos) << fault << "\n" << out;
  }
  EXPECT_EQ(std::regex_search(out, std::regex(R"(as expected, [1-9][0-9]* not)")), false) << out;
}

TEST(LoadTool, FailedCallsAreCountedByStatusAndFailTheRun) {
  setenv("KVCOMPACT_AUTH_TOKEN", "load-test-token-0123456789", 1);
  ServerProcess server;
  unsetenv("KVCOMPACT_AUTH_TOKEN");
  ASSERT_TRUE(server.ok()) << server.Log();
  std::string out;
  const int code = RunCommand({CliBinary(), "load", "--server=" + server.address(), "--concurrency=2", "--duration=1",
                               "--report_every=1", "--layers=1", "--kv_heads=1", "--context=128", "--queries=32"},
                              &out);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("failed calls UNAUTHENTICATED: "), std::string::npos) << out;
  EXPECT_NE(out.find("0 calls ok"), std::string::npos) << out;
}

}  // namespace
}  // namespace kvcompact::testing

namespace kvcompact::testing {
namespace {

// A target with several addresses (as a headless Service resolves) gets its streams spread over
// all of them.
TEST(Balancing, StreamsSpreadOverEveryAddressOfTheTarget) {
  ServerProcess a, b;
  ASSERT_TRUE(a.ok() && b.ok()) << a.Log() << b.Log();
  client::ClientOptions options;
  options.streams = 8;
  const std::string target = "ipv4:" + a.address() + "," + b.address();
  client::Client client(target, options);
  // round_robin picks among the addresses that are connected; the first call can start before the
  // second connection is up (seen under load), so a few calls, each complete, until both served.
  auto served = [&](ServerProcess* s) { return MetricValue(s->metrics_port(), "kvcompact_streams_total") >= 1; };
  for (int call = 0; call < 10 && !(served(&a) && served(&b)); ++call) {
    auto outcome = client.Compact(Header(16, 2, 64, v1::METHOD_H2O, 4), ToInputs(MakeLayers(16, 2, 128, 64)));
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    EXPECT_EQ(outcome->layers.size(), 16u);
  }
  for (ServerProcess* server : {&a, &b}) {
    EXPECT_GE(MetricValue(server->metrics_port(), "kvcompact_streams_total"), 1) << "every server got streams";
  }
}

}  // namespace
}  // namespace kvcompact::testing
