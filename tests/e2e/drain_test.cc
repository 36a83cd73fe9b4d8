// Graceful drain of the real server: SIGTERM turns health NOT_SERVING, new calls are still served
// during the drain delay, in-flight streams finish or end with a clean status, exit code 0; a
// second signal exits at once.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <thread>

#include "tests/e2e/helpers.h"
#include "tests/e2e/server_process.h"

namespace kvcompact::testing {
namespace {

TEST(Drain, DelayKeepsServingNewCallsWhileHealthSaysNotServing) {
  ServerProcess server({"--drain_delay_seconds=3"});
  ASSERT_TRUE(server.ok()) << server.Log();
  server.Signal(SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  for (const std::string& service : {std::string(), std::string("kvcompact.v1.KVCompact")}) {
    auto serving = client::Client(server.health_address()).IsServing(service, 2);
    ASSERT_TRUE(serving.ok()) << serving.status();
    EXPECT_FALSE(*serving) << "service '" << service << "'";
  }
  EXPECT_EQ(MetricValue(server.metrics_port(), "kvcompact_serving"), 0);
  auto late = client::Client(server.address()).Compact(Header(1, 2, 64, v1::METHOD_H2O, 4), ToInputs(MakeLayers(1, 2, 128, 64)));
  ASSERT_TRUE(late.ok()) << "a call routed during the drain delay is still served: " << late.status();
  EXPECT_EQ(late->layers.size(), 1u);
  EXPECT_EQ(server.WaitForExit(30), 0) << server.Log();
  EXPECT_NE(server.Log().find("stopped cleanly"), std::string::npos);
}

TEST(Drain, StreamsPastTheShutdownTimeoutEndWithACleanStatus) {
  ServerProcess server({"--shutdown_timeout_seconds=0.5"});
  ASSERT_TRUE(server.ok()) << server.Log();
  // A stream that cannot finish by itself: its layer is half-sent and the client waits.
  auto stub = v1::KVCompact::NewStub(grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  auto stream = stub->Compact(&ctx);
  ASSERT_TRUE(stream->Write(HeaderRequest(Header(1, 2, 64, v1::METHOD_H2O, 4))));
  ASSERT_TRUE(stream->Write(client::ChunkLayer(ToInput(MakeLayers(1, 2, 4096, 64)[0]), 1 << 20).front()));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  server.Signal(SIGTERM);
  v1::CompactResponse response;
  while (stream->Read(&response)) {}
  const grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.error_code() == grpc::StatusCode::CANCELLED || status.error_code() == grpc::StatusCode::UNAVAILABLE)
      << status.error_code() << " " << status.error_message();
  EXPECT_EQ(server.WaitForExit(30), 0) << server.Log();
  EXPECT_NE(server.Log().find("stopped cleanly"), std::string::npos);
}

TEST(Drain, SecondSignalExitsAtOnce) {
  ServerProcess server({"--drain_delay_seconds=60"});
  ASSERT_TRUE(server.ok()) << server.Log();
  server.Signal(SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  server.Signal(SIGINT);
  // Within the 60 s drain delay only the second signal can end the process.
  EXPECT_EQ(server.WaitForExit(10), 1) << server.Log();
  EXPECT_NE(server.Log().find("second signal: exiting now"), std::string::npos);
}

}  // namespace
}  // namespace kvcompact::testing
