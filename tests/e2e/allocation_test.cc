// End to end: budgets across heads (Allocation) and OMP through the real server.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>

#include <unistd.h>

#include <gtest/gtest.h>

#include "client/safetensors.h"
#include "core/budget.h"
#include "tests/e2e/helpers.h"
#include "tests/e2e/server_process.h"

namespace kvcompact::testing {
namespace {

constexpr int kLayers = 4, kHeads = 2, kTokens = 400, kQueries = 200;

// One directory per test process: CTest runs this suite's tests as parallel processes, and a
// shared file rewritten by one while another's server reads it fails that server's start.
std::string ProfileDir() {
  const std::string dir = ::testing::TempDir() + "kvcompact_profiles_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/toy.json") << R"({"name": "toy", "model": "test", "numLayers": 4, "numKvHeads": 2,
    "shares": [8, 1, 4, 1, 2, 1, 1, 1], "method": "written by the test"})";
  return dir;
}

class Allocation : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess({"--profiles_dir=" + ProfileDir()});
    inputs_ = new std::vector<client::LayerInput>(ToInputs(MakeLayers(kLayers, kHeads, kTokens, kQueries, 17)));
  }
  static void TearDownTestSuite() {
    delete server_;
    delete inputs_;
  }
  void SetUp() override { ASSERT_TRUE(server_->ok()) << server_->Log(); }

  // Per-(layer, head) t as the server reported it (tokens_out), checked against the returned rows.
  static std::vector<int64_t> Run(const v1::StreamHeader& header, int streams = 1) {
    client::ClientOptions options;
    options.streams = streams;
    client::Client cl(server_->address(), options);
    auto outcome = cl.Compact(header, *inputs_);
    EXPECT_TRUE(outcome.ok()) << outcome.status();
    if (!outcome.ok()) return {};
    EXPECT_TRUE(outcome->errors.empty()) << outcome->errors.front().message();
    std::vector<int64_t> t(kLayers * kHeads, 0);
    for (const auto& layer : outcome->layers) {
      for (int h = 0; h < kHeads; ++h) {
        t[layer.layer * kHeads + h] = static_cast<int64_t>(layer.done.heads(h).tokens_out());
        EXPECT_EQ(layer.heads[h].tokens, layer.done.heads(h).tokens_out());
        EXPECT_EQ(layer.heads[h].beta.size(), layer.heads[h].tokens);
      }
    }
    return t;
  }

  static v1::StreamHeader AllocationHeader(v1::Allocation::Rule rule, double ratio = 10) {
    v1::StreamHeader h = Header(kLayers, kHeads, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 1);
    v1::Allocation* a = h.mutable_options()->mutable_budget()->mutable_allocation();
    a->set_rule(rule);
    a->set_ratio(ratio);
    return h;
  }

  static ServerProcess* server_;
  static std::vector<client::LayerInput>* inputs_;
};
ServerProcess* Allocation::server_ = nullptr;
std::vector<client::LayerInput>* Allocation::inputs_ = nullptr;

int64_t Sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

TEST_F(Allocation, UniformIsRatioPerHead) {
  EXPECT_EQ(Run(AllocationHeader(v1::Allocation::RULE_UNIFORM)), std::vector<int64_t>(kLayers * kHeads, 40));
}

TEST_F(Allocation, PyramidGivesEarlierLayersMoreWithTheSameTotal) {
  v1::StreamHeader h = AllocationHeader(v1::Allocation::RULE_PYRAMID);
  h.mutable_options()->mutable_budget()->mutable_allocation()->set_pyramid_spread(3);
  const std::vector<int64_t> t = Run(h);
  EXPECT_EQ(Sum(t), kLayers * kHeads * 40);
  EXPECT_EQ(t, *WaterFill(PyramidShares(kLayers, kHeads, 3), std::vector<int64_t>(kLayers * kHeads, 300), 320));
  EXPECT_GT(t[0], t[6]);
  // Layers spread over parallel streams get the same split (each stream computes the whole request's).
  EXPECT_EQ(Run(h, 3), t);
}

TEST_F(Allocation, ProfileByNameAndInlineGiveTheSameSplit) {
  v1::StreamHeader h = AllocationHeader(v1::Allocation::RULE_PROFILE);
  h.mutable_options()->mutable_budget()->mutable_allocation()->set_profile("toy");
  const std::vector<int64_t> by_name = Run(h);
  EXPECT_EQ(Sum(by_name), 320);
  // Shares 8:1:4:1:2:1:1:1 of 320 with a cap of 0.75 x 400 = 300: head (0, 0) gets 8/19 x 320 = 134.7.
  EXPECT_EQ(by_name, *WaterFill({8, 1, 4, 1, 2, 1, 1, 1}, std::vector<int64_t>(8, 300), 320));
  v1::StreamHeader inline_h = AllocationHeader(v1::Allocation::RULE_PROFILE);
  for (float s : {8, 1, 4, 1, 2, 1, 1, 1}) inline_h.mutable_options()->mutable_budget()->mutable_allocation()->add_shares(s);
  EXPECT_EQ(Run(inline_h), by_name);
}

TEST_F(Allocation, CapIsWaterFilled) {
  v1::StreamHeader h = AllocationHeader(v1::Allocation::RULE_PROFILE, 4);  // 100 per head, 800 in all
  v1::Allocation* a = h.mutable_options()->mutable_budget()->mutable_allocation();
  for (float s : {100, 1, 1, 1, 1, 1, 1, 1}) a->add_shares(s);
  a->set_head_cap(0.5f);  // at most 200 per head
  const std::vector<int64_t> t = Run(h);
  EXPECT_EQ(t[0], 200);
  EXPECT_EQ(Sum(t), 800);
  for (int i = 1; i < 8; ++i) EXPECT_NEAR(t[i], 600 / 7.0, 1);
}

TEST_F(Allocation, PerLayerRulesKeepEachLayersTotal) {
  for (auto rule : {v1::Allocation::RULE_GLOBAL_TOPK, v1::Allocation::RULE_SENSITIVITY}) {
    const std::vector<int64_t> t = Run(AllocationHeader(rule));
    ASSERT_EQ(t.size(), static_cast<size_t>(kLayers * kHeads));
    for (int l = 0; l < kLayers; ++l) EXPECT_EQ(t[l * kHeads] + t[l * kHeads + 1], 80) << "rule " << rule << " layer " << l;
  }
}

TEST_F(Allocation, BadAllocationsAreRefusedWithAReason) {
  struct Case { std::function<void(v1::Allocation*)> mutate; grpc::StatusCode code; std::string text; };
  const std::vector<Case> cases = {
      {[](v1::Allocation* a) { a->set_ratio(0); }, grpc::INVALID_ARGUMENT, "allocation.ratio must be > 0"},
      {[](v1::Allocation* a) { a->set_rule(v1::Allocation::RULE_PROFILE); a->set_profile("nope"); }, grpc::NOT_FOUND, "no budget profile named 'nope'"},
      {[](v1::Allocation* a) { a->set_rule(v1::Allocation::RULE_PROFILE); a->add_shares(1); }, grpc::INVALID_ARGUMENT, "needs num_layers x num_kv_heads = 8"},
      {[](v1::Allocation* a) { a->set_head_cap(1.5f); }, grpc::INVALID_ARGUMENT, "head_cap"},
      {[](v1::Allocation* a) { a->set_rule(static_cast<v1::Allocation::Rule>(99)); }, grpc::INVALID_ARGUMENT, "rule is unknown"},
  };
  for (const Case& c : cases) {
    v1::StreamHeader h = AllocationHeader(v1::Allocation::RULE_UNIFORM);
    c.mutate(h.mutable_options()->mutable_budget()->mutable_allocation());
    auto outcome = client::Client(server_->address()).Compact(h, *inputs_);
    ASSERT_FALSE(outcome.ok()) << c.text;
    EXPECT_EQ(static_cast<int>(outcome.status().code()), static_cast<int>(c.code)) << outcome.status();
    EXPECT_NE(std::string(outcome.status().message()).find(c.text), std::string::npos) << outcome.status();
  }
}

TEST_F(Allocation, RequestWideRulesNeedTheSameTInEveryLayer) {
  std::vector<client::LayerInput> inputs = *inputs_;
  const auto shorter = MakeLayers(kLayers, kHeads, kTokens / 2, kQueries, 18);
  inputs[2] = ToInput(shorter[2]);  // layer 2 has T = 200, the others 400
  auto outcome = client::Client(server_->address()).Compact(AllocationHeader(v1::Allocation::RULE_PYRAMID), inputs);
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  ASSERT_EQ(outcome->errors.size(), 1u);
  EXPECT_EQ(outcome->errors[0].layer(), 2u);
  EXPECT_NE(outcome->errors[0].message().find("the same T"), std::string::npos) << outcome->errors[0].message();
  EXPECT_EQ(outcome->layers.size(), static_cast<size_t>(kLayers - 1));
  // Per-layer rules take each layer's own T.
  outcome = client::Client(server_->address()).Compact(AllocationHeader(v1::Allocation::RULE_SENSITIVITY), inputs);
  ASSERT_TRUE(outcome.ok());
  EXPECT_TRUE(outcome->errors.empty());
}

TEST_F(Allocation, ServerInfoListsLoadedProfiles) {
  auto info = client::Client(server_->address()).GetServerInfo();
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->profiles_size(), 1);
  EXPECT_EQ(info->profiles(0), "toy");
}

TEST_F(Allocation, OmpThroughTheServiceMeetsBudgetsAndBeatsHighestAttentionOnMass) {
  auto mass_error = [&](v1::Method method) {
    v1::StreamHeader h = Header(kLayers, kHeads, 64, method, 20);
    auto outcome = client::Client(server_->address()).Compact(h, *inputs_);
    EXPECT_TRUE(outcome.ok()) << outcome.status();
    double err = 0;
    for (const auto& l : outcome->layers) {
      for (const auto& m : l.done.heads()) {
        EXPECT_EQ(m.tokens_out(), 20u);
        err += m.mass_rel_error();
      }
    }
    return err;
  };
  const double am = mass_error(v1::METHOD_AM_HIGHEST_ATTENTION);
  EXPECT_LT(mass_error(v1::METHOD_AM_OMP), am);
  EXPECT_LT(mass_error(v1::METHOD_AM_OMP_FAST), am);
}

TEST_F(Allocation, ChunkedCompactionKeepsBudgetsAndIndexesTheWholeBlock) {
  v1::StreamHeader h = Header(kLayers, kHeads, 64, v1::METHOD_AM_HIGHEST_ATTENTION, 10);
  h.mutable_options()->set_chunk_tokens(150);  // 400 tokens: 3 chunks
  auto outcome = client::Client(server_->address()).Compact(h, *inputs_);
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  ASSERT_TRUE(outcome->errors.empty());
  for (const auto& layer : outcome->layers) {
    for (int i = 0; i < kHeads; ++i) {
      const client::CompactedHead& head = layer.heads[i];
      ASSERT_EQ(head.tokens, 40u);
      int chunks_hit[3] = {0, 0, 0};
      for (uint32_t idx : head.indices) {
        ASSERT_LT(idx, static_cast<uint32_t>(kTokens));
        ++chunks_hit[idx * 3 / kTokens];
      }
      EXPECT_EQ(chunks_hit[0] + chunks_hit[1] + chunks_hit[2], 40);
      EXPECT_GE(chunks_hit[0], 13);
      EXPECT_GE(chunks_hit[2], 13);
      EXPECT_TRUE(layer.done.heads(i).has_quality());
      EXPECT_LT(layer.done.heads(i).output_rel_error(), 0.6f);
    }
  }
  h.mutable_options()->set_chunk_tokens(5);  // 80 chunks for a budget of 40: refused for the layer
  outcome = client::Client(server_->address()).Compact(h, *inputs_);
  ASSERT_TRUE(outcome.ok());
  ASSERT_EQ(outcome->errors.size(), static_cast<size_t>(kLayers));
  EXPECT_NE(outcome->errors[0].message().find("raise chunk_tokens"), std::string::npos) << outcome->errors[0].message();
}

// Ragged results end to end: a very uneven profile split, written by the CLI in both layouts. The
// files hold sum_h t_h rows (no padding to the longest head): their bytes stay within 5% of the
// blocks' own bytes.
TEST_F(Allocation, RaggedFilesCostTheBudgetNotThePadding) {
  const std::string in = ::testing::TempDir() + "/ragged_in.safetensors";
  std::string log;
  ASSERT_EQ(RunCommand({CliBinary(), "generate", "--output=" + in, "--layers=4", "--kv_heads=2", "--context=2048",
                        "--queries=256", "--head_dim=64"}, &log), 0) << log;
  for (const std::string layout : {"per_head", "packed"}) {
    const std::string out = ::testing::TempDir() + "/ragged_" + layout + ".safetensors";
    ASSERT_EQ(RunCommand({CliBinary(), "compact", "--server=" + server_->address(), "--input=" + in, "--output=" + out,
                          "--ratio=8", "--allocation=profile", "--profile=toy", "--layout=" + layout,
                          "--output_dtype=bf16", "--quiet"}, &log), 0) << log;
    auto file = client::ReadSafetensors(out);
    ASSERT_TRUE(file.ok()) << file.status();
    // 2048 / 8 = 256 per head, 2048 in all, split 8:1:4:1:2:1:1:1 under a cap of 1536.
    const std::vector<int64_t> want = *WaterFill({8, 1, 4, 1, 2, 1, 1, 1}, std::vector<int64_t>(8, 1536), 2048);
    uint64_t rows = 0;
    for (int l = 0; l < kLayers; ++l) {
      if (layout == "packed") {
        const std::vector<int32_t>& offsets = file->int32_tensors.at("layers." + std::to_string(l) + ".offsets");
        ASSERT_EQ(offsets.size(), 3u);
        for (int h = 0; h < kHeads; ++h) EXPECT_EQ(offsets[h + 1] - offsets[h], want[l * kHeads + h]);
        EXPECT_EQ(file->tensors.at("layers." + std::to_string(l) + ".keys").shape[0], offsets[2]);
      } else {
        for (int h = 0; h < kHeads; ++h) {
          EXPECT_EQ(file->tensors.at("layers." + std::to_string(l) + ".heads." + std::to_string(h) + ".keys").shape[0],
                    want[l * kHeads + h]);
        }
      }
      for (int h = 0; h < kHeads; ++h) rows += want[l * kHeads + h];
    }
    const double payload = rows * (64 * 2 * 2 + 4.0);  // bf16 keys and values, fp32 beta
    const double padded = kLayers * kHeads * double(*std::max_element(want.begin(), want.end())) * (64 * 2 * 2 + 4.0);
    const double bytes = static_cast<double>(std::filesystem::file_size(out));
    EXPECT_LE(bytes / payload, 1.05) << layout;
    EXPECT_LT(bytes, 0.5 * padded) << layout;  // what padding every head to the longest would cost
    EXPECT_NE(log.find("compacted blocks: " + std::to_string(static_cast<uint64_t>(payload)) + " bytes"), std::string::npos) << log;
  }
}

}  // namespace
}  // namespace kvcompact::testing
