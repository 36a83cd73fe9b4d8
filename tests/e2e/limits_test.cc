// Admission control and deadlines against the real server: host-memory bounds per layer and
// across streams, deadlines that end streams cleanly, limits reported by GetServerInfo.
#include <gtest/gtest.h>

#include <thread>

#include "tests/e2e/helpers.h"
#include "tests/e2e/server_process.h"

namespace kvcompact::testing {
namespace {

TEST(Admission, ALayerOverTheHostMemoryBoundIsRefusedAndTheServerGoesOn) {
  ServerProcess server({"--max_host_memory_bytes=6291456"});  // 6 MiB
  ASSERT_TRUE(server.ok()) << server.Log();
  auto info = client::Client(server.address()).GetServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->limits().max_host_memory_bytes(), 6291456u);

  // 2 heads x 8,192 tokens of fp32 K and V alone are 8 MiB.
  auto big = client::Client(server.address()).Compact(Header(1, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 8),
                                                      ToInputs(MakeLayers(1, 2, 8192, 256)));
  ASSERT_TRUE(big.ok()) << big.status();
  ASSERT_EQ(big->errors.size(), 1u);
  EXPECT_EQ(big->errors[0].code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  EXPECT_NE(big->errors[0].message().find("max_host_memory_bytes"), std::string::npos) << big->errors[0].message();
  EXPECT_NE(big->errors[0].message().find("Send fewer tokens"), std::string::npos) << big->errors[0].message();

  auto small = client::Client(server.address()).Compact(Header(2, 2, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 8),
                                                        ToInputs(MakeLayers(2, 2, 512, 256)));
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_TRUE(small->errors.empty()) << small->errors[0].message();
  EXPECT_EQ(small->layers.size(), 2u);
  EXPECT_EQ(MetricValue(server.metrics_port(), "kvcompact_host_memory_reserved_bytes"), 0) << "every reservation returned";
  EXPECT_EQ(MetricValue(server.metrics_port(), "kvcompact_host_memory_limit_bytes"), 6291456);
}

TEST(Admission, LayersHalfSentByOtherStreamsCountAgainstTheBound) {
  // 5 MiB: room for one such layer while its chunks are decoded (each chunk's message and fp32
  // buffers are admitted too), not for two.
  ServerProcess server({"--max_host_memory_bytes=5242880"});
  ASSERT_TRUE(server.ok()) << server.Log();
  const client::LayerInput layer = ToInput(MakeLayers(1, 1, 4096, 0)[0]);  // ~2 MiB of K/V buffers
  const std::vector<v1::CompactRequest> chunks = client::ChunkLayer(layer, 1 << 20);
  ASSERT_GT(chunks.size(), 2u);
  const v1::CompactRequest header = HeaderRequest(Header(1, 1, 64, v1::METHOD_STREAMING_LLM, 8));

  // Stream A: header and the first chunk, then it waits with its layer open.
  auto stub = v1::KVCompact::NewStub(grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  auto a = stub->Compact(&ctx);
  ASSERT_TRUE(a->Write(header) && a->Write(chunks[0]));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_GT(MetricValue(server.metrics_port(), "kvcompact_host_memory_reserved_bytes"), 2e6);

  // Stream B: the same layer does not fit beside A's; it is refused as transient.
  std::vector<v1::CompactRequest> b_requests = {header};
  b_requests.insert(b_requests.end(), chunks.begin(), chunks.end());
  const RawResult b = RawCompact(server.address(), b_requests);
  EXPECT_TRUE(b.status.ok()) << b.status.error_message();
  ASSERT_EQ(b.errors().size(), 1u);
  EXPECT_EQ(b.errors()[0].code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  EXPECT_NE(b.errors()[0].message().find("Retry later"), std::string::npos) << b.errors()[0].message();

  // A finishes its layer; then B's retry fits.
  for (size_t i = 1; i < chunks.size(); ++i) ASSERT_TRUE(a->Write(chunks[i]));
  a->WritesDone();
  v1::CompactResponse resp;
  int done = 0;
  while (a->Read(&resp)) done += resp.has_layer_done();
  EXPECT_TRUE(a->Finish().ok());
  EXPECT_EQ(done, 1);
  const RawResult retry = RawCompact(server.address(), b_requests);
  EXPECT_TRUE(retry.errors().empty()) << retry.errors()[0].message();
  EXPECT_EQ(retry.layers_done(), 1);
}

TEST(Deadlines, AnExpiredDeadlineEndsTheStreamAndTheServerGoesOn) {
  ServerProcess server;
  ASSERT_TRUE(server.ok()) << server.Log();
  // A stream whose layer is half-sent when its deadline passes (independent of compute speed).
  auto stub = v1::KVCompact::NewStub(grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  auto stream = stub->Compact(&ctx);
  ASSERT_TRUE(stream->Write(HeaderRequest(Header(1, 2, 64, v1::METHOD_H2O, 4))));
  ASSERT_TRUE(stream->Write(client::ChunkLayer(ToInput(MakeLayers(1, 2, 4096, 64)[0]), 1 << 20).front()));
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  v1::CompactResponse response;
  while (stream->Read(&response)) {}
  const grpc::Status status = stream->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  auto serving = client::Client(server.health_address()).IsServing();
  ASSERT_TRUE(serving.ok() && *serving);
  auto again = client::Client(server.address()).Compact(Header(1, 2, 64, v1::METHOD_H2O, 4), ToInputs(MakeLayers(1, 2, 128, 64)));
  ASSERT_TRUE(again.ok()) << again.status();
  // The server saw the expired stream as cancelled, and its streams are all gone.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_GE(MetricValue(server.metrics_port(), R"(kvcompact_streams_finished_total{code="CANCELLED"})"), 1);
  EXPECT_EQ(MetricValue(server.metrics_port(), "kvcompact_streams_in_flight"), 0);
  EXPECT_EQ(MetricValue(server.metrics_port(), "kvcompact_host_memory_reserved_bytes"), 0);
}

}  // namespace
}  // namespace kvcompact::testing
