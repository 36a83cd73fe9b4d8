// The server against hostile and broken clients (raw gRPC and hand-written HTTP/2, not the
// project's client): every case ends in a clear status, the server stays SERVING, and what a
// client made it hold (memory, stream slots, the worker, log volume) comes back within a bound.
#include <signal.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <thread>

#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "core/dtype.h"
#include "tests/e2e/helpers.h"
#include "tests/e2e/raw_clients.h"
#include "tests/e2e/server_process.h"

namespace kvcompact::testing {
namespace {

constexpr uint64_t k2p31 = uint64_t{1} << 31, k2p32 = uint64_t{1} << 32, k2p62 = uint64_t{1} << 62,
                   k2p63 = uint64_t{1} << 63, kMax64 = ~uint64_t{0};

int64_t ResidentBytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  int64_t kb = -1;
  while (in >> key) {
    if (key == "VmRSS:") {
      in >> kb;
      break;
    }
  }
  return kb * 1024;
}

// Keys or values of a result as floats; fails the test on NaN or Inf (DecodeToFloat refuses them).
std::vector<float> Floats(const std::string& bytes, DType dtype) {
  std::vector<float> out(bytes.size() / DTypeSize(dtype));
  const absl::Status s = DecodeToFloat(bytes.data(), dtype, out.size(), out.data());
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

bool Serving(const ServerProcess& server) {
  auto serving = client::Client(server.health_address()).IsServing("", 5);
  return serving.ok() && *serving;
}

// Polls a metric until it exceeds `floor` (or `seconds` pass); returns the last value.
double AwaitMetricAbove(const ServerProcess& server, const std::string& series, double floor, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int>(seconds * 1000));
  double v = MetricValue(server.metrics_port(), series);
  while (!(v > floor) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    v = MetricValue(server.metrics_port(), series);
  }
  return v;
}

// Polls a metric until it equals `want` (or `seconds` pass); returns the last value.
double AwaitMetric(const ServerProcess& server, const std::string& series, double want, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int>(seconds * 1000));
  double v = MetricValue(server.metrics_port(), series);
  while (v != want && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    v = MetricValue(server.metrics_port(), series);
  }
  return v;
}

v1::Tensor F32(std::vector<int64_t> shape, size_t elements, float value = 0.5f) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_FP32);
  for (int64_t s : shape) t.add_shape(s);
  std::vector<float> data(elements, value);
  t.set_data(std::string(reinterpret_cast<const char*>(data.data()), data.size() * 4));
  return t;
}

v1::CompactRequest Kv(uint32_t layer, uint64_t token_begin, uint64_t layer_tokens, int64_t rows, int64_t d,
                      size_t elements, float value = 0.5f) {
  v1::CompactRequest r;
  v1::KVChunk* kv = r.mutable_kv();
  kv->set_layer(layer);
  kv->set_head_begin(0);
  kv->set_head_end(1);
  kv->set_token_begin(token_begin);
  kv->set_layer_tokens(layer_tokens);
  *kv->mutable_keys() = F32({1, rows, d}, elements, value);
  *kv->mutable_values() = F32({1, rows, d}, elements, value);
  return r;
}

v1::CompactRequest End(uint32_t layer) {
  v1::CompactRequest r;
  r.mutable_layer_end()->set_layer(layer);
  return r;
}

// A valid generated layer as chunks.
std::vector<v1::CompactRequest> LayerChunks(uint32_t layer, int heads, int tokens, int queries, uint64_t max_bytes = 1 << 20) {
  LayerData d = MakeLayers(1, heads, tokens, queries, 7 + layer)[0];
  d.layer = static_cast<int32_t>(layer);
  client::LayerInput in = ToInput(d);
  in.layer = layer;
  return client::ChunkLayer(in, max_bytes);
}

void ExpectLayerError(const RawResult& r, grpc::StatusCode code, const std::string& text) {
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const auto errors = r.errors();
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].code(), static_cast<int>(code)) << errors[0].message();
  EXPECT_NE(errors[0].message().find(text), std::string::npos) << errors[0].message();
}

class Adversarial : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess({"--idle_timeout_seconds=2", "--layer_receive_timeout_seconds=4",
                                 "--max_concurrent_streams=8"});
  }
  static void TearDownTestSuite() { delete server_; }
  void SetUp() override { ASSERT_TRUE(server_->ok()) << server_->Log(); }
  void TearDown() override {
    EXPECT_TRUE(Serving(*server_)) << "server unhealthy after the test";
    EXPECT_EQ(AwaitMetric(*server_, "kvcompact_host_memory_reserved_bytes", 0, 10), 0) << "reservations returned";
  }
  static ServerProcess* server_;
};
ServerProcess* Adversarial::server_ = nullptr;

// C1: offsets and shapes that wrap in 64-bit arithmetic.
TEST_F(Adversarial, OffsetsAndShapesThatWrapAreRefused) {
  const v1::CompactRequest header = HeaderRequest(Header(1, 1, 4, v1::METHOD_H2O, 2));
  // The 79-byte stream: [1, 2^62, 4] with no data at token 2^64 - 2^62.
  ExpectLayerError(RawCompact(server_->address(), {header, Kv(0, kMax64 - k2p62 + 1, 64, int64_t{1} << 62, 4, 0)}),
                   grpc::StatusCode::INVALID_ARGUMENT, "not within layer_tokens");
  // 64 real rows at 2^64 - 8: would have been written before the layer's buffers.
  ExpectLayerError(RawCompact(server_->address(), {header, Kv(0, kMax64 - 7, 64, 64, 4, 256)}),
                   grpc::StatusCode::INVALID_ARGUMENT, "not within layer_tokens");
  for (uint64_t begin : {uint64_t{64}, uint64_t{65}, k2p31, k2p32, k2p63, kMax64}) {
    ExpectLayerError(RawCompact(server_->address(), {header, Kv(0, begin, 64, 1, 4, 4)}),
                     grpc::StatusCode::INVALID_ARGUMENT, "not within layer_tokens");
  }
  // Rows: negative, larger than T, 2^62 with a matching layer_tokens over the limit.
  for (int64_t rows : {int64_t{-1}, int64_t{-(int64_t{1} << 62)}, int64_t{65}, int64_t{1} << 40}) {
    const RawResult r = RawCompact(server_->address(), {header, Kv(0, 0, 64, rows, 4, 4)});
    ASSERT_EQ(r.errors().size(), 1u) << rows;
    EXPECT_EQ(r.errors()[0].code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  }
  ExpectLayerError(RawCompact(server_->address(), {header, Kv(0, 0, k2p62, 4, 4, 16)}),
                   grpc::StatusCode::INVALID_ARGUMENT, "max_tokens_per_block");
  // Queries at 2^64 - 8.
  v1::CompactRequest q;
  q.mutable_queries()->set_layer(0);
  q.mutable_queries()->set_head_end(1);
  q.mutable_queries()->set_query_begin(kMax64 - 7);
  q.mutable_queries()->set_layer_queries(16);
  *q.mutable_queries()->mutable_queries() = F32({1, 16, 4}, 64);
  ExpectLayerError(RawCompact(server_->address(), {header, Kv(0, 0, 64, 64, 4, 256), q, End(0)}),
                   grpc::StatusCode::INVALID_ARGUMENT, "not within layer_queries");
  // Heads: empty, reversed, past the geometry.
  for (auto [b, e] : {std::pair<uint32_t, uint32_t>{0, 0}, {1, 0}, {0, 2}, {0, 0xffffffffu}}) {
    v1::CompactRequest kv = Kv(0, 0, 64, 64, 4, 256);
    kv.mutable_kv()->set_head_begin(b);
    kv.mutable_kv()->set_head_end(e);
    ExpectLayerError(RawCompact(server_->address(), {header, kv}), grpc::StatusCode::INVALID_ARGUMENT, "head range");
  }
}

// H1: sink_tokens at and past 2^31 (once cast to a negative int: rows at negative indices).
TEST_F(Adversarial, SinkTokensPastInt32AreRefusedAndTheLargestValidOneKeepsOwnRows) {
  for (uint64_t sinks : {k2p31, k2p32 - 1}) {
    v1::StreamHeader h = Header(1, 1, 64, v1::METHOD_STREAMING_LLM, 8);
    h.mutable_options()->set_sink_tokens(static_cast<uint32_t>(sinks));
    std::vector<v1::CompactRequest> s = {HeaderRequest(h)};
    for (auto& c : LayerChunks(0, 1, 256, 0)) s.push_back(c);
    const RawResult r = RawCompact(server_->address(), s);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << sinks;
    EXPECT_NE(r.status.error_message().find("sink_tokens"), std::string::npos) << r.status.error_message();
  }
  v1::StreamHeader h = Header(1, 1, 64, v1::METHOD_STREAMING_LLM, 8);
  h.mutable_options()->set_sink_tokens(static_cast<uint32_t>(k2p31 - 1));
  const LayerData layer = MakeLayers(1, 1, 256, 0, 7)[0];
  auto out = client::Client(server_->address()).Compact(h, {ToInput(layer)});
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_TRUE(out->errors.empty()) << out->errors[0].message();
  const auto& head = out->layers.at(0).heads.at(0);
  ASSERT_EQ(head.indices.size(), 32u);
  const std::vector<float> keys = Floats(head.keys, head.dtype);
  for (size_t r = 0; r < head.indices.size(); ++r) {
    EXPECT_EQ(head.indices[r], r) << "every kept row is one of the first tokens (all sinks)";
    for (int c = 0; c < 64; ++c) ASSERT_EQ(keys[r * 64 + c], layer.keys[head.indices[r] * 64 + c]) << "the block's own rows";
  }
}

// L4: a ratio so small that T / ratio is infinite keeps every row.
TEST_F(Adversarial, TinyRatiosKeepTheWholeBlock) {
  for (double ratio : {1e-300, 4.9e-324, 0.5}) {
    v1::StreamHeader h = Header(1, 1, 64, v1::METHOD_H2O, ratio);
    auto out = client::Client(server_->address()).Compact(h, ToInputs(MakeLayers(1, 1, 128, 16)));
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_TRUE(out->errors.empty()) << out->errors[0].message();
    EXPECT_EQ(out->layers.at(0).heads.at(0).indices.size(), 128u) << ratio;
  }
}

// L5: magnitudes beyond the documented bound are refused; the bound itself is served, finite.
TEST_F(Adversarial, MagnitudesPastTheBoundAreRefusedAndResultsStayFinite) {
  const v1::CompactRequest header = HeaderRequest(Header(1, 1, 4, v1::METHOD_AM_HIGHEST_ATTENTION, 4));
  for (float big : {1e19f, 65505.0f, -3e38f}) {
    ExpectLayerError(RawCompact(server_->address(), {header, Kv(0, 0, 64, 64, 4, 256, big)}),
                     grpc::StatusCode::INVALID_ARGUMENT, "largest magnitude accepted");
  }
  // Keys of +-65504 in alternating rows, values of 65504: logits around 1e9 apart.
  LayerData d = MakeLayers(1, 1, 256, 64, 11)[0];
  for (size_t i = 0; i < d.keys.size(); ++i) d.keys[i] = (i / 64) % 2 ? 65504.0f : -65504.0f;
  for (float& v : d.values) v = 65504.0f;
  for (DType out_dtype : {DType::kFloat32, DType::kFloat16}) {
    v1::StreamHeader h = Header(1, 1, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 4);
    h.mutable_options()->set_output_dtype(out_dtype == DType::kFloat16 ? v1::DTYPE_FP16 : v1::DTYPE_FP32);
    auto out = client::Client(server_->address()).Compact(h, {ToInput(d)});
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_TRUE(out->errors.empty()) << out->errors[0].message();
    const auto& head = out->layers.at(0).heads.at(0);
    for (float b : head.beta) ASSERT_TRUE(std::isfinite(b));
    Floats(head.keys, head.dtype);
    Floats(head.values, head.dtype);
    EXPECT_TRUE(std::isfinite(out->layers.at(0).done.heads(0).output_rel_error()));
  }
}

// L6: request ids are echoed into logs: bounded and printable only.
TEST_F(Adversarial, RequestIdsCannotForgeLogLines) {
  for (const std::string& id : {std::string("a\nFORGED critical line"), std::string("tab\there"), std::string(257, 'x'),
                                std::string("\x1b[31mred")}) {
    v1::StreamHeader h = Header(1, 1, 64, v1::METHOD_H2O, 4);
    h.set_request_id(id);
    const RawResult r = RawCompact(server_->address(), {HeaderRequest(h)});
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(r.status.error_message().find("request_id"), std::string::npos);
  }
  EXPECT_EQ(server_->Log().find("FORGED"), std::string::npos);
  v1::StreamHeader ok = Header(1, 1, 64, v1::METHOD_H2O, 4);
  ok.set_request_id(std::string(256, 'r'));
  auto out = client::Client(server_->address()).Compact(ok, ToInputs(MakeLayers(1, 1, 64, 8)));
  ASSERT_TRUE(out.ok()) << out.status();
}

// L1: a message that is not a CompactRequest ends the stream INVALID_ARGUMENT (not OK, done = 0).
TEST_F(Adversarial, AnUndecodableMessageEndsTheStreamInvalidArgument) {
  const std::string header = HeaderRequest(Header(1, 1, 64, v1::METHOD_H2O, 4)).SerializeAsString();
  for (const std::string& garbage : {std::string("\xff\xff\xff\xff\xff", 5), std::string("\x12\x7f", 2),
                                     std::string("\x0a\x05\x0a\x01", 4)}) {
    const RawBytesResult r = RawBytesCall(server_->address(), "/kvcompact.v1.KVCompact/Compact", {header, garbage});
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.status.error_message();
    EXPECT_NE(r.status.error_message().find("message 2 of the stream"), std::string::npos) << r.status.error_message();
  }
  // Unary methods too (gRPC's typed handlers answered UNIMPLEMENTED).
  for (const char* method : {"/kvcompact.v1.KVCompact/GetServerInfo", "/kvcompact.v1.KVCompact/SelfTest"}) {
    const RawBytesResult r = RawBytesCall(server_->address(), method, {std::string("\xff\xff\xff", 3)});
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << method << ": " << r.status.error_message();
    EXPECT_NE(r.status.error_message().find("is not a valid kvcompact.v1."), std::string::npos) << r.status.error_message();
  }
  const RawBytesResult info = RawBytesCall(server_->address(), "/kvcompact.v1.KVCompact/GetServerInfo", {""});
  EXPECT_TRUE(info.status.ok()) << info.status.error_message();
  v1::ServerInfo parsed;
  ASSERT_EQ(info.responses.size(), 1u);
  ASSERT_TRUE(parsed.ParseFromString(info.responses[0]));
  EXPECT_EQ(parsed.limits().max_concurrent_streams(), 8u);
}

// L2: data after LayerEnd, a layer sent twice, a second LayerEnd.
TEST_F(Adversarial, ChunksAfterLayerEndAreAProtocolError) {
  const v1::CompactRequest header = HeaderRequest(Header(2, 1, 64, v1::METHOD_H2O, 4));
  std::vector<v1::CompactRequest> layer0 = LayerChunks(0, 1, 128, 16);
  std::vector<v1::CompactRequest> once = {header};
  once.insert(once.end(), layer0.begin(), layer0.end());
  struct Case { std::vector<v1::CompactRequest> tail; std::string text; };
  const std::vector<Case> cases = {{{End(0)}, "a second LayerEnd"},
                                   {{layer0.front()}, "a chunk after its LayerEnd"},
                                   {layer0, "a chunk after its LayerEnd"}};
  for (const Case& c : cases) {
    std::vector<v1::CompactRequest> s = once;
    s.insert(s.end(), c.tail.begin(), c.tail.end());
    const RawResult r = RawCompact(server_->address(), s);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.status.error_message();
    EXPECT_NE(r.status.error_message().find(c.text), std::string::npos) << r.status.error_message();
  }
}

// L3: half-close with a layer half-sent: that layer is reported, not silently forgotten.
TEST_F(Adversarial, HalfCloseWithAHalfSentLayerReportsIt) {
  std::vector<v1::CompactRequest> s = {HeaderRequest(Header(2, 1, 64, v1::METHOD_H2O, 4))};
  for (auto& c : LayerChunks(0, 1, 128, 16)) s.push_back(c);
  auto layer1 = LayerChunks(1, 1, 128, 16);
  s.push_back(layer1.front());  // no LayerEnd for layer 1
  const RawResult r = RawCompact(server_->address(), s);
  ExpectLayerError(r, grpc::StatusCode::INVALID_ARGUMENT, "half-closed before this layer's LayerEnd");
  EXPECT_EQ(r.errors()[0].layer(), 1u);
  EXPECT_EQ(r.layers_done(), 1);
  ASSERT_TRUE(r.responses.back().has_summary());
  EXPECT_EQ(r.responses.back().summary().layers_done(), 1u);
  EXPECT_EQ(r.responses.back().summary().layers_failed(), 1u);
}

// M1 + L9: streams that send a header and nothing else (or Sink streams) hold a slot only until
// the idle timeout; Sink streams count against the same limit.
TEST_F(Adversarial, IdleStreamsEndAndGiveBackTheirSlots) {
  auto stub = v1::KVCompact::NewStub(grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReaderWriter<v1::CompactRequest, v1::CompactResponse>>> idle;
  for (int i = 0; i < 6; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    idle.push_back(stub->Compact(contexts.back().get()));
    ASSERT_TRUE(idle.back()->Write(HeaderRequest(Header(1, 1, 64, v1::METHOD_H2O, 4))));
  }
  grpc::ClientContext sink_ctx[2];
  v1::SinkSummary sink_summary[2];
  std::unique_ptr<grpc::ClientWriter<v1::CompactRequest>> sinks[2];
  for (int i = 0; i < 2; ++i) sinks[i] = stub->Sink(&sink_ctx[i], &sink_summary[i]);
  ASSERT_EQ(AwaitMetric(*server_, "kvcompact_streams_in_flight", 6, 5), 6);
  // All 8 slots are taken (6 Compact + 2 Sink): the next stream is refused at once.
  const RawResult refused = RawCompact(server_->address(), {HeaderRequest(Header(1, 1, 64, v1::METHOD_H2O, 4))});
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.status.error_message();
  for (int i = 0; i < 2; ++i) {
    sinks[i]->WritesDone();
    EXPECT_TRUE(sinks[i]->Finish().ok());
  }
  // The idle Compact streams end DEADLINE_EXCEEDED after --idle_timeout_seconds=2.
  for (auto& s : idle) {
    v1::CompactResponse resp;
    while (s->Read(&resp)) {}
    const grpc::Status st = s->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
    EXPECT_NE(st.error_message().find("idle_timeout_seconds"), std::string::npos) << st.error_message();
  }
  EXPECT_EQ(AwaitMetric(*server_, "kvcompact_streams_in_flight", 0, 5), 0);
  auto out = client::Client(server_->address()).Compact(Header(1, 1, 64, v1::METHOD_H2O, 4), ToInputs(MakeLayers(1, 1, 64, 8)));
  ASSERT_TRUE(out.ok()) << out.status();
}

// M2: a half-sent layer that declared a large T holds its reservation only until a timeout.
TEST_F(Adversarial, AHalfSentLayerGivesItsReservationBack) {
  auto stub = v1::KVCompact::NewStub(grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  {  // One small message declaring 2^20 tokens, then silence: the layer and the stream time out.
    grpc::ClientContext ctx;
    auto s = stub->Compact(&ctx);
    ASSERT_TRUE(s->Write(HeaderRequest(Header(1, 1, 64, v1::METHOD_H2O, 4))));
    ASSERT_TRUE(s->Write(Kv(0, 0, 1 << 20, 8, 64, 512)));
    EXPECT_GT(AwaitMetricAbove(*server_, "kvcompact_host_memory_reserved_bytes", 500e6, 1.5), 500e6);
    v1::CompactResponse resp;
    std::vector<v1::LayerError> errors;
    while (s->Read(&resp)) if (resp.has_layer_error()) errors.push_back(resp.layer_error());
    EXPECT_EQ(s->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
    ASSERT_EQ(errors.size(), 1u);
    EXPECT_EQ(errors[0].code(), static_cast<int>(grpc::StatusCode::DEADLINE_EXCEEDED));
    EXPECT_EQ(AwaitMetric(*server_, "kvcompact_host_memory_reserved_bytes", 0, 5), 0);
  }
  {  // A row every 0.4 s keeps the stream alive, but the layer is not complete within 4 s.
    grpc::ClientContext ctx;
    auto s = stub->Compact(&ctx);
    ASSERT_TRUE(s->Write(HeaderRequest(Header(1, 1, 64, v1::METHOD_H2O, 4))));
    v1::CompactResponse resp;
    bool failed = false;
    std::thread reader([&] {
      while (s->Read(&resp)) {
        if (resp.has_layer_error()) {
          EXPECT_EQ(resp.layer_error().code(), static_cast<int>(grpc::StatusCode::DEADLINE_EXCEEDED));
          EXPECT_NE(resp.layer_error().message().find("layer_receive_timeout_seconds"), std::string::npos);
          failed = true;
        }
      }
    });
    for (int row = 0; row < 18 && s->Write(Kv(0, row, 4096, 1, 64, 64)); ++row) {
      std::this_thread::sleep_for(std::chrono::milliseconds(400));
    }
    s->WritesDone();
    reader.join();
    EXPECT_TRUE(failed);
    EXPECT_TRUE(s->Finish().ok());
  }
}

// H4: a client that sends layers and never reads: the server stops reading and computing once
// its responses pile up, then cancels the stream after the idle timeout; memory comes back.
TEST_F(Adversarial, AClientThatNeverReadsStopsBeingServed) {
  const int64_t rss_before = ResidentBytes(server_->pid());
  auto stub = v1::KVCompact::NewStub(grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  auto s = stub->Compact(&ctx);
  v1::StreamHeader h = Header(64, 1, 64, v1::METHOD_TRUNCATE_RECENT, 1);  // ratio 1: responses as large as requests
  ASSERT_TRUE(s->Write(HeaderRequest(h)));
  std::atomic<int> written{0};
  std::thread writer([&] {
    for (uint32_t layer = 0; layer < 64; ++layer) {
      for (auto& c : LayerChunks(layer, 1, 8192, 0)) {  // chunks and the LayerEnd
        if (!s->Write(c)) return;
      }
      ++written;
    }
  });
  const double cancelled = AwaitMetric(*server_, R"(kvcompact_streams_finished_total{code="CANCELLED"})", -2, 0);
  // The stream is cancelled once its oldest response waited more than 2 s for the client.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  int64_t rss_peak = 0;
  while (MetricValue(server_->metrics_port(), R"(kvcompact_streams_finished_total{code="CANCELLED"})") <= cancelled &&
         std::chrono::steady_clock::now() < deadline) {
    rss_peak = std::max(rss_peak, ResidentBytes(server_->pid()));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_GT(MetricValue(server_->metrics_port(), R"(kvcompact_streams_finished_total{code="CANCELLED"})"), cancelled);
  ctx.TryCancel();
  writer.join();
  EXPECT_LT(written.load(), 64) << "the server stopped reading before taking every layer";
  // 64 layers of 4 MiB each way would be 512 MiB; the outbound bound is 64 MiB.
  EXPECT_LT(rss_peak - rss_before, int64_t{300} << 20) << "peak " << rss_peak << " before " << rss_before;
  EXPECT_EQ(AwaitMetric(*server_, "kvcompact_streams_in_flight", 0, 5), 0);
}

// H5: SelfTest cannot take the worker: bounded lists and work, one at a time, cancellable.
TEST_F(Adversarial, SelfTestIsBoundedAndCannotMonopoliseTheWorker) {
  auto stub = v1::KVCompact::NewStub(grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  auto call = [&](const v1::SelfTestRequest& req, double seconds) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int>(seconds * 1000)));
    v1::SelfTestResponse resp;
    return stub->SelfTest(&ctx, req, &resp);
  };
  v1::SelfTestRequest many;
  for (int i = 0; i < 1000; ++i) many.add_methods(v1::METHOD_AM_HIGHEST_ATTENTION);
  EXPECT_EQ(call(many, 10).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::SelfTestRequest huge;
  huge.set_tokens(16384);
  huge.set_queries(8192);
  huge.set_heads(8);
  for (int m : {1, 4, 5}) huge.add_methods(static_cast<v1::Method>(m));
  const grpc::Status too_big = call(huge, 10);
  EXPECT_EQ(too_big.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(too_big.error_message().find("too large"), std::string::npos) << too_big.error_message();
  // The largest allowed self-test, with a short deadline: a second one meanwhile is refused, and
  // the first stops at its next head once its deadline has passed.
  huge.mutable_methods()->RemoveLast();
  std::thread first([&] { EXPECT_EQ(call(huge, 0.5).error_code(), grpc::StatusCode::DEADLINE_EXCEEDED); });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const grpc::Status second = call(huge, 10);
  EXPECT_EQ(second.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << second.error_message();
  first.join();
  auto out = client::Client(server_->address()).Compact(Header(1, 1, 64, v1::METHOD_H2O, 4), ToInputs(MakeLayers(1, 1, 64, 8)));
  ASSERT_TRUE(out.ok()) << out.status();
}

// M4: clients dripping bytes into /metrics do not block scrapes: every scrape is answered while
// all of them are still connected and dripping (before, the first one held the endpoint until it
// stopped).
TEST_F(Adversarial, MetricsAreServedWhileAClientDripsBytes) {
  std::atomic<bool> stop{false};
  std::atomic<int> connected{0}, dropped{0};
  std::vector<std::thread> drippers;
  for (int i = 0; i < 4; ++i) {
    drippers.emplace_back([&] {
      const int fd = ConnectLoopback(server_->metrics_port());
      if (fd < 0) return;
      ++connected;
      while (!stop) {
        if (send(fd, "G", 1, MSG_NOSIGNAL) != 1) {  // closed by the server
          ++dropped;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      close(fd);
    });
  }
  while (connected < 4) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // each has sent a few bytes
  for (int i = 0; i < 5; ++i) {
    EXPECT_NE(HttpGet(server_->metrics_port(), "/metrics").find("kvcompact_build_info"), std::string::npos);
  }
  EXPECT_EQ(dropped.load(), 0) << "the scrapes were answered only after drippers were dropped";
  stop = true;
  for (auto& t : drippers) t.join();
}

// L8: the plaintext health-only port serves health and nothing else (no reflection, no API).
TEST_F(Adversarial, TheHealthPortServesHealthOnly) {
  const std::string list_services("\x3a\x00", 2);  // ServerReflectionRequest{list_services: ""}
  const std::string method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
  const RawBytesResult main_port = RawBytesCall(server_->address(), method, {list_services});
  EXPECT_TRUE(main_port.status.ok()) << main_port.status.error_message();
  ASSERT_EQ(main_port.responses.size(), 1u);
  EXPECT_NE(main_port.responses[0].find("kvcompact.v1.KVCompact"), std::string::npos);
  EXPECT_EQ(RawBytesCall(server_->health_address(), method, {list_services}).status.error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(RawBytesCall(server_->health_address(), "/kvcompact.v1.KVCompact/GetServerInfo", {""}).status.error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
}

// H3: OMP's candidate-pool Gram matrices are inside admission (not an OOM kill).
TEST(AdversarialMemory, OmpPoolsAreAdmittedBeforeTheyAreAllocated) {
  ServerProcess server({"--max_host_memory_bytes=67108864"});  // 64 MiB
  ASSERT_TRUE(server.ok()) << server.Log();
  v1::StreamHeader h = Header(1, 1, 64, v1::METHOD_AM_OMP, 8);
  h.mutable_options()->mutable_omp()->set_candidates(kMax64);  // every key: a 4096 x 4096 Gram system
  const int64_t rss_before = ResidentBytes(server.pid());
  auto out = client::Client(server.address()).Compact(h, ToInputs(MakeLayers(1, 1, 4096, 64)));
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->errors.size(), 1u);
  EXPECT_EQ(out->errors[0].code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  EXPECT_NE(out->errors[0].message().find("method's working memory"), std::string::npos) << out->errors[0].message();
  EXPECT_LT(ResidentBytes(server.pid()) - rss_before, int64_t{64} << 20);
  // A pool that fits is served.
  h.mutable_options()->mutable_omp()->set_candidates(1024);
  auto small = client::Client(server.address()).Compact(h, ToInputs(MakeLayers(1, 1, 4096, 64)));
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_TRUE(small->errors.empty()) << small->errors[0].message();
}

// L7: refused calls cost a bounded number of log lines.
TEST(AdversarialLogs, RefusedCallsAreLoggedAtABoundedRate) {
  char dir_template[] = "/tmp/kvcompact-adv-XXXXXX";
  const std::string dir = mkdtemp(dir_template);
  std::ofstream(dir + "/tokens") << "a-token-of-at-least-sixteen-characters\n";
  ServerProcess server({"--auth_token_file=" + dir + "/tokens"});
  ASSERT_TRUE(server.ok()) << server.Log();
  auto stub = v1::KVCompact::NewStub(grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials()));
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 400; ++i) {
    grpc::ClientContext ctx;
    v1::ServerInfo info;
    ASSERT_EQ(stub->GetServerInfo(&ctx, {}, &info).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // The next line that passes says how many were dropped.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  grpc::ClientContext ctx;
  v1::ServerInfo info;
  EXPECT_EQ(stub->GetServerInfo(&ctx, {}, &info).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  const std::string log = server.Log();
  size_t lines = 0;
  for (size_t p = 0; (p = log.find("unauthenticated call", p)) != std::string::npos; ++p) ++lines;
  EXPECT_GE(lines, 1u);
  EXPECT_LE(lines, static_cast<size_t>(10 * (std::ceil(seconds) + 2))) << "over " << seconds << " s";
  EXPECT_NE(log.find("similar lines suppressed"), std::string::npos);
  std::remove((dir + "/tokens").c_str());
  rmdir(dir.c_str());
}

// M3: SIGTERM while a long layer computes: the process exits within the shutdown timeout plus
// the documented margin (the layer stops at its next head, or the exit bound ends the process).
TEST(AdversarialShutdown, SigtermExitsWithinTheTimeoutWhileALayerComputes) {
  ServerProcess server({"--shutdown_timeout_seconds=1", "--drain_delay_seconds=0"});
  ASSERT_TRUE(server.ok()) << server.Log();
  std::thread client([&] {
    // 8 heads x 32k tokens x 2k queries: tens of seconds of compute on two cores.
    (void)client::Client(server.address()).Compact(Header(1, 8, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 20),
                                                   ToInputs(MakeLayers(1, 8, 32768, 2048)));
  });
  ASSERT_GE(AwaitMetric(server, "kvcompact_layers_total{result=\"ok\"}", -2, 0), 0);
  // Wait until the layer has been handed to the worker (its reservation is held until it ends).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (MetricValue(server.metrics_port(), "kvcompact_chunks_total") < 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::this_thread::sleep_for(std::chrono::seconds(3));
  const auto signalled = std::chrono::steady_clock::now();
  server.Signal(SIGTERM);
  const int code = server.WaitForExit(1 + 5 + 3);
  EXPECT_NE(code, -1) << "still running " << std::chrono::duration<double>(std::chrono::steady_clock::now() - signalled).count()
                      << " s after SIGTERM";
  client.join();
}

// H2: HTTP/2 rapid reset (HEADERS + DATA + RST_STREAM in a loop, no token needed to send them).
// gRPC 1.51 queues every reset stream as a call, so the peak is the attack's size (the residual
// risk docs/operations.md states, with a proxy in front as the protection); what the server
// guarantees: stream reactors stay bounded, memory comes back once the burst is over, the log
// stays short, and it keeps serving.
TEST(AdversarialHttp2, RapidResetLeavesStreamsLogsAndMemoryBounded) {
  ServerProcess server({"--max_concurrent_streams=16"});
  ASSERT_TRUE(server.ok()) << server.Log();
  const int port = std::stoi(server.address().substr(server.address().rfind(':') + 1));
  const int64_t rss_before = ResidentBytes(server.pid());
  const size_t log_before = server.Log().size();
  std::atomic<int> sent{0};
  std::vector<std::thread> attackers;
  for (int c = 0; c < 4; ++c) {
    attackers.emplace_back([&] { sent += RapidReset(port, "/kvcompact.v1.KVCompact/Compact", 25000); });
  }
  for (auto& t : attackers) t.join();
  // The server works through the queued calls after the attacker is gone; sample meanwhile.
  int64_t rss_peak = 0, rss = 0;
  double in_flight_peak = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int settled = 0; settled < 30 && std::chrono::steady_clock::now() - start < std::chrono::seconds(60);) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    rss = ResidentBytes(server.pid());
    rss_peak = std::max(rss_peak, rss);
    const double in_flight = MetricValue(server.metrics_port(), "kvcompact_streams_in_flight");
    in_flight_peak = std::max(in_flight_peak, in_flight);
    settled = (in_flight == 0 && rss - rss_before < (int64_t{128} << 20)) ? settled + 1 : 0;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const size_t log_bytes = server.Log().size() - log_before;
  std::printf("rapid reset: %d streams on 4 connections; RSS before %.0f MiB, peak %.0f MiB, %.0f MiB %.1f s later; "
              "streams in flight at most %.0f; log +%zu bytes\n",
              sent.load(), rss_before / 1048576.0, rss_peak / 1048576.0, rss / 1048576.0, seconds, in_flight_peak, log_bytes);
  EXPECT_GT(sent.load(), 50000);
  EXPECT_LE(in_flight_peak, 2 * 16) << "reactors beyond 2 x max_concurrent_streams";
  EXPECT_LT(rss - rss_before, int64_t{128} << 20) << "freed memory was not returned";
  EXPECT_LT(log_bytes, size_t{64} << 10) << "log volume";
  EXPECT_TRUE(Serving(server));
  auto out = client::Client(server.address()).Compact(Header(1, 1, 64, v1::METHOD_H2O, 4), ToInputs(MakeLayers(1, 1, 64, 8)));
  ASSERT_TRUE(out.ok()) << out.status();
}

}  // namespace
}  // namespace kvcompact::testing
