// Starting the real server where an operator can get it wrong: a port already in use fails the
// start (no silent port sharing), the CUDA fallback of --backend=auto shows in the metrics, and
// the budget profiles are found from the binary's location, not a build machine's path.
#include <gtest/gtest.h>

#include <filesystem>

#include "tests/e2e/helpers.h"
#include "tests/e2e/server_process.h"

namespace kvcompact::testing {
namespace {

TEST(Startup, ASecondServerOnAPortInUseFailsToStart) {
  ServerProcess first;
  ASSERT_TRUE(first.ok()) << first.Log();
  std::string log;
  EXPECT_EQ(RunCommand({ServerBinary(), "--listen=" + first.address(), "--metrics_listen=", "--warmup=false",
                        "--backend=cpu"}, &log), 2) << log;
  EXPECT_NE(log.find("cannot listen on " + first.address()), std::string::npos) << log;
  EXPECT_EQ(log.find("SERVING"), std::string::npos) << log;
  auto serving = client::Client(first.address()).IsServing();
  ASSERT_TRUE(serving.ok() && *serving) << "the first server still serves";
}

TEST(Startup, AutoBackendFallbackIsAMetricAndAWarning) {
  ServerProcess cpu({"--backend=cpu"});
  ASSERT_TRUE(cpu.ok()) << cpu.Log();
  EXPECT_EQ(MetricValue(cpu.metrics_port(), "kvcompact_backend_fallback"), 0);
  ServerProcess automatic({"--backend=auto"});
  ASSERT_TRUE(automatic.ok()) << automatic.Log();
  // A CUDA build on a machine without a usable device falls back; elsewhere it does not.
  const bool fell_back = automatic.Log().find("no usable CUDA device") != std::string::npos;
  EXPECT_EQ(MetricValue(automatic.metrics_port(), "kvcompact_backend_fallback"), fell_back ? 1 : 0) << automatic.Log();
  if (fell_back) {
    EXPECT_NE(automatic.Log().find("[warning]"), std::string::npos) << automatic.Log();
  }
}

TEST(Startup, ProfilesAreFoundBesideTheBinaryWithoutAFlag) {
  ServerProcess server;
  ASSERT_TRUE(server.ok()) << server.Log();
  // Where the binary looks (the source path is not compiled in): <prefix>/share/kvcompact/profiles
  // for an installed server, the repository's profiles/ for one in the build tree.
  namespace fs = std::filesystem;
  const fs::path bin = fs::canonical(ServerBinary()).parent_path();
  const bool beside = fs::is_directory(bin.parent_path() / "share" / "kvcompact" / "profiles") ||
                      fs::is_directory(bin.parent_path().parent_path() / "profiles");
  if (beside) {
    EXPECT_NE(server.Log().find("budget profiles: gemma-3-270m, smollm2-135m-instruct"), std::string::npos)
        << server.Log();
  } else {  // a binary copied elsewhere: none found, said so, and the server still serves
    EXPECT_NE(server.Log().find("no budget profiles loaded"), std::string::npos) << server.Log();
  }
}

}  // namespace
}  // namespace kvcompact::testing
