// Bad input gets a precise status and message, the rest of the stream goes on where it can, and the
// server stays healthy.
#include <cmath>
#include <limits>
#include <thread>

#include <gtest/gtest.h>

#include "tests/e2e/helpers.h"
#include "tests/e2e/server_process.h"

namespace kvcompact::testing {
namespace {

class BadInput : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess({"--max_message_bytes=1048576", "--max_tokens_per_block=100000"});
  }
  static void TearDownTestSuite() { delete server_; }
  void SetUp() override { ASSERT_TRUE(server_->ok()) << server_->Log(); }
  void TearDown() override {
    auto serving = client::Client(server_->address()).IsServing();
    ASSERT_TRUE(serving.ok() && *serving) << "server unhealthy after the test";
  }

  // A valid 2-layer, 2-head stream: header, layer chunks, layer ends.
  std::vector<v1::CompactRequest> ValidStream(v1::Method method = v1::METHOD_AM_HIGHEST_ATTENTION) {
    std::vector<v1::CompactRequest> out = {HeaderRequest(Header(2, 2, 64, method, 8))};
    for (const auto& d : MakeLayers(2, 2, 128, 64)) {
      auto chunks = client::ChunkLayer(ToInput(d), 1 << 20);
      out.insert(out.end(), chunks.begin(), chunks.end());
    }
    return out;
  }
  static v1::CompactRequest* FirstKV(std::vector<v1::CompactRequest>& s, uint32_t layer) {
    for (auto& r : s) if (r.has_kv() && r.kv().layer() == layer) return &r;
    return nullptr;
  }
  static ServerProcess* server_;
};
ServerProcess* BadInput::server_ = nullptr;

void ExpectOneLayerError(const RawResult& r, uint32_t layer, const std::string& text) {
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const auto errors = r.errors();
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].layer(), layer);
  EXPECT_EQ(errors[0].code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_NE(errors[0].message().find(text), std::string::npos) << errors[0].message();
  EXPECT_EQ(r.layers_done(), 1) << "the other layer must still be compacted";
  ASSERT_TRUE(r.responses.back().has_summary());
  EXPECT_EQ(r.responses.back().summary().layers_failed(), 1u);
}

TEST_F(BadInput, HeaderMissing) {
  auto s = ValidStream();
  s.erase(s.begin());
  const RawResult r = RawCompact(server_->address(), s);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("first message of a Compact stream must be a StreamHeader"), std::string::npos);
}

TEST_F(BadInput, EmptyStream) {
  const RawResult r = RawCompact(server_->address(), {});
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("before a StreamHeader"), std::string::npos);
}

TEST_F(BadInput, BadBudgets) {
  struct Case { std::function<void(v1::Options*)> mutate; std::string text; };
  const std::vector<Case> cases = {
      {[](v1::Options* o) { o->mutable_budget()->set_ratio(0); }, "budget.ratio must be > 0"},
      {[](v1::Options* o) { o->mutable_budget()->set_ratio(-3); }, "budget.ratio must be > 0"},
      {[](v1::Options* o) { o->mutable_budget()->set_tokens(0); }, "budget.tokens must be > 0"},
      {[](v1::Options* o) { o->clear_budget(); }, "options.budget is required"},
      {[](v1::Options* o) { o->mutable_budget()->mutable_per_head()->add_tokens(3); }, "needs num_layers * num_kv_heads = 4"},
      {[](v1::Options* o) { o->set_holdout_fraction(0.95f); }, "holdout_fraction"},
      {[](v1::Options* o) { o->set_method(static_cast<v1::Method>(42)); }, "options.method is unknown"},
  };
  for (const Case& c : cases) {
    auto s = ValidStream();
    c.mutate(s[0].mutable_header()->mutable_options());
    const RawResult r = RawCompact(server_->address(), s);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.text;
    EXPECT_NE(r.status.error_message().find(c.text), std::string::npos) << r.status.error_message();
  }
}

TEST_F(BadInput, BadGeometry) {
  auto s = ValidStream();
  s[0].mutable_header()->mutable_geometry()->set_head_dim(0);
  const RawResult r = RawCompact(server_->address(), s);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("head_dim"), std::string::npos);
  // Declared sizes that would make per-request tables huge (layers x heads) are refused up front.
  for (auto [layers, heads, what] : {std::tuple{4097u, 2u, "num_layers"}, std::tuple{2u, 1025u, "num_kv_heads"},
                                     std::tuple{4294967295u, 1024u, "num_layers"}}) {
    auto big = ValidStream();
    big[0].mutable_header()->mutable_geometry()->set_num_layers(layers);
    big[0].mutable_header()->mutable_geometry()->set_num_kv_heads(heads);
    big[0].mutable_header()->mutable_options()->mutable_budget()->mutable_allocation()->set_rule(v1::Allocation::RULE_PYRAMID);
    big[0].mutable_header()->mutable_options()->mutable_budget()->mutable_allocation()->set_ratio(4);
    const RawResult refused = RawCompact(server_->address(), big);
    EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << what;
    EXPECT_NE(refused.status.error_message().find(what), std::string::npos) << refused.status.error_message();
  }
  auto serving = client::Client(server_->address()).IsServing();
  EXPECT_TRUE(serving.ok() && *serving);
}

TEST_F(BadInput, WrongShapeFailsOnlyThatLayer) {
  auto s = ValidStream();
  FirstKV(s, 1)->mutable_kv()->mutable_keys()->set_shape(2, 32);
  ExpectOneLayerError(RawCompact(server_->address(), s), 1, "keys: shape [2, 128, 32], expected [2, 128, 64]");
}

TEST_F(BadInput, WrongDtypeAndByteCount) {
  auto s = ValidStream();
  FirstKV(s, 0)->mutable_kv()->mutable_values()->set_dtype(v1::DTYPE_UNSPECIFIED);
  ExpectOneLayerError(RawCompact(server_->address(), s), 0, "values: unsupported dtype");
  s = ValidStream();
  FirstKV(s, 0)->mutable_kv()->mutable_keys()->mutable_data()->resize(100);
  ExpectOneLayerError(RawCompact(server_->address(), s), 0, "keys: 100 bytes");
  s = ValidStream();
  FirstKV(s, 1)->mutable_kv()->mutable_keys()->set_dtype(v1::DTYPE_BF16);  // fp32 bytes labelled bf16
  ExpectOneLayerError(RawCompact(server_->address(), s), 1, "expected 32768");
}

TEST_F(BadInput, NanAndInfAreRejected) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    auto s = ValidStream();
    std::string* data = FirstKV(s, 1)->mutable_kv()->mutable_keys()->mutable_data();
    std::memcpy(data->data() + 4 * 77, &bad, 4);
    ExpectOneLayerError(RawCompact(server_->address(), s), 1, "keys: non-finite value");
  }
}

TEST_F(BadInput, MissingQueriesForAQueryMethod) {
  auto s = ValidStream();
  s.erase(std::remove_if(s.begin(), s.end(), [](const v1::CompactRequest& r) { return r.has_queries() && r.queries().layer() == 0; }), s.end());
  ExpectOneLayerError(RawCompact(server_->address(), s), 0, "no reference queries were sent; method am needs them");
  // A query-free method compacts the same input.
  s = ValidStream(v1::METHOD_TRUNCATE_RECENT);
  s.erase(std::remove_if(s.begin(), s.end(), [](const v1::CompactRequest& r) { return r.has_queries(); }), s.end());
  const RawResult r = RawCompact(server_->address(), s);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.layers_done(), 2);
}

TEST_F(BadInput, MissingTokensAndOverlaps) {
  auto s = ValidStream();
  v1::CompactRequest* kv = FirstKV(s, 0);
  kv->mutable_kv()->set_layer_tokens(200);  // claims more tokens than are sent
  ExpectOneLayerError(RawCompact(server_->address(), s), 0, "keys/values missing: head 0 rows [128, 200)");
  s = ValidStream();
  v1::CompactRequest dup = *FirstKV(s, 1);
  s.insert(s.begin() + 1, dup);  // the same rows twice
  ExpectOneLayerError(RawCompact(server_->address(), s), 1, "were already sent");
}

TEST_F(BadInput, UnknownLayer) {
  auto s = ValidStream();
  v1::CompactRequest extra = *FirstKV(s, 0);
  extra.mutable_kv()->set_layer(99);
  s.push_back(extra);
  s.push_back(extra);  // reported once, not once per chunk
  const RawResult r = RawCompact(server_->address(), s);
  ASSERT_TRUE(r.status.ok());
  ASSERT_EQ(r.errors().size(), 1u);
  EXPECT_NE(r.errors()[0].message().find("layer 99 is not within [0, 2)"), std::string::npos) << r.errors()[0].message();
  EXPECT_EQ(r.layers_done(), 2);
}

TEST_F(BadInput, TooManyTokensPerBlock) {
  auto s = ValidStream();
  FirstKV(s, 0)->mutable_kv()->set_layer_tokens(200000);
  ExpectOneLayerError(RawCompact(server_->address(), s), 0, "max_tokens_per_block");
}

TEST_F(BadInput, BudgetAtLeastTokensReturnsBlockUnchanged) {
  auto s = ValidStream();
  s[0].mutable_header()->mutable_options()->mutable_budget()->set_tokens(500);  // T = 128
  const RawResult r = RawCompact(server_->address(), s);
  ASSERT_TRUE(r.status.ok());
  EXPECT_TRUE(r.errors().empty());
  for (const auto& resp : r.responses) {
    if (resp.has_head()) {
      EXPECT_EQ(resp.head().head_tokens(), 128u);
    }
    if (resp.has_layer_done()) {
      for (const auto& h : resp.layer_done().heads()) EXPECT_LT(h.output_rel_error(), 1e-5f);
    }
  }
  // The returned keys are the sent keys, in order.
  const v1::CompactResponse* first_head = nullptr;
  for (const auto& resp : r.responses) if (resp.has_head() && resp.head().layer() == 0 && resp.head().head() == 0) { first_head = &resp; break; }
  ASSERT_NE(first_head, nullptr);
  const std::string& sent = FirstKV(s, 0)->kv().keys().data();
  EXPECT_EQ(first_head->head().keys().data(), sent.substr(0, 128 * 64 * 4));
}

TEST_F(BadInput, OversizeMessageIsRefusedByTheTransport) {
  auto s = ValidStream();
  FirstKV(s, 0)->mutable_kv()->mutable_keys()->mutable_data()->append(2 << 20, '\0');
  const RawResult r = RawCompact(server_->address(), s);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << r.status.error_message();
}

TEST_F(BadInput, UnaryRequestsAreValidated) {
  v1::SelfTestRequest big;
  big.set_tokens(1 << 20);
  auto r = client::Client(server_->address()).SelfTest(big);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("self-test limits"), std::string::npos);
}

TEST(Limits, StreamsOverTheLimitGetResourceExhausted) {
  ServerProcess server({"--max_concurrent_streams=1"});
  ASSERT_TRUE(server.ok()) << server.Log();
  // Hold one stream open: header sent, never half-closed until the check is done.
  grpc::ChannelArguments args;
  auto stub = v1::KVCompact::NewStub(grpc::CreateCustomChannel(server.address(), grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext ctx;
  auto held = stub->Compact(&ctx);
  ASSERT_TRUE(held->Write(HeaderRequest(Header(1, 1, 64, v1::METHOD_H2O, 4))));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const RawResult second = RawCompact(server.address(), {HeaderRequest(Header(1, 1, 64, v1::METHOD_H2O, 4))});
  EXPECT_EQ(second.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(second.status.error_message().find("max_concurrent_streams = 1"), std::string::npos);
  held->WritesDone();
  v1::CompactResponse resp;
  while (held->Read(&resp)) {}
  EXPECT_TRUE(held->Finish().ok());
  const RawResult third = RawCompact(server.address(), {HeaderRequest(Header(1, 1, 64, v1::METHOD_H2O, 4))});
  EXPECT_TRUE(third.status.ok()) << third.status.error_message();
}

}  // namespace
}  // namespace kvcompact::testing
