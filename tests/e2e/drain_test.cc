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
  EXPECT_NE(HttpGet(server.metrics_port(), "/metrics").find("\nkvcompact_serving 0"), std::string::npos);
  auto late = client::Client(server.address()).Compact(Header(1, 2, 64, v1::METHOD_H2O, 4), ToInputs(MakeLayers(1, 2, 128, 64)));
  ASSERT_TRUE(late.ok()) << "a call routed during the drain delay is still served: " << late.status();
  EXPECT_EQ(late->layers.size(), 1u);
  EXPECT_EQ(server.WaitForExit(30), 0) << server.Log();
  EXPECT_NE(server.Log().find("stopped cleanly"), std::string::npos);
}

TEST(Drain, StreamsPastTheShutdownTimeoutEndWithACleanStatus) {
  ServerProcess server({"--shutdown_timeout_seconds=0.5"});
  ASSERT_TRUE(server.ok()) << server.Log();
  absl::StatusOr<client::CompactOutcome> outcome;
  std::thread stream([&] {
    outcome = client::Client(server.address())
                  .Compact(Header(8, 2, 64, v1::METHOD_AM_OMP, 20), ToInputs(MakeLayers(8, 2, 2048, 1024, 6)),
                           [&](const client::CompactedLayer& l) {
                             if (l.layer == 0) server.Signal(SIGTERM);
                           });
  });
  stream.join();
  EXPECT_EQ(server.WaitForExit(30), 0) << server.Log();
  ASSERT_FALSE(outcome.ok()) << "8 OMP layers cannot finish within 0.5 s of the signal";
  EXPECT_TRUE(outcome.status().code() == absl::StatusCode::kCancelled ||
              outcome.status().code() == absl::StatusCode::kUnavailable)
      << outcome.status();
}

TEST(Drain, SecondSignalExitsAtOnce) {
  ServerProcess server({"--drain_delay_seconds=60"});
  ASSERT_TRUE(server.ok()) << server.Log();
  server.Signal(SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto start = std::chrono::steady_clock::now();
  server.Signal(SIGINT);
  EXPECT_EQ(server.WaitForExit(10), 1) << server.Log();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5);
  EXPECT_NE(server.Log().find("second signal: exiting now"), std::string::npos);
}

}  // namespace
}  // namespace kvcompact::testing
