#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

#include "core/dtype.h"
#include "core/method.h"
#include "core/selection.h"
#include "core/thread_pool.h"

namespace kvcompact {
namespace {

TEST(DType, HalfAndBFloat16RoundTripWithinTheirPrecision) {
  std::vector<float> in = {0.f, 1.f, -2.5f, 3.14159f, 1e-3f, -65504.f};
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    std::vector<uint8_t> wire(in.size() * DTypeSize(dt));
    EncodeFromFloat(in.data(), in.size(), dt, wire.data());
    std::vector<float> out(in.size());
    ASSERT_TRUE(DecodeToFloat(wire.data(), dt, in.size(), out.data()).ok());
    const float eps = dt == DType::kFloat32 ? 0.f : dt == DType::kFloat16 ? 1e-3f : 8e-3f;
    for (size_t i = 0; i < in.size(); ++i) EXPECT_NEAR(out[i], in[i], eps * std::abs(in[i]) + 1e-7);
  }
}

TEST(DType, RoundThroughGivesWhatTheDecodeOfTheEncodingGives) {
  const float tie = 1.f + 1.f / 256;  // halfway between two bf16 values: to even, 1
  std::vector<float> v = {tie, 3.f, 1.f + 1.f / 128, 70000.f};
  std::vector<float> bf = v, hf = v, f32 = v;
  RoundThrough(bf, DType::kBFloat16);
  RoundThrough(hf, DType::kFloat16);
  RoundThrough(f32, DType::kFloat32);
  EXPECT_EQ(bf, (std::vector<float>{1.f, 3.f, 1.f + 1.f / 128, 70144.f}));
  EXPECT_EQ(hf[0], tie);  // fp16 holds it exactly
  EXPECT_TRUE(std::isinf(hf[3]));  // over fp16's range
  EXPECT_EQ(f32, v);
}

TEST(DType, DecodeRejectsNanAndInf) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> in = {1.f, bad, 2.f};
    for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      std::vector<uint8_t> wire(in.size() * DTypeSize(dt));
      EncodeFromFloat(in.data(), in.size(), dt, wire.data());
      std::vector<float> out(in.size());
      const absl::Status s = DecodeToFloat(wire.data(), dt, in.size(), out.data());
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(s.message().find("element 1"), std::string_view::npos) << s;
    }
  }
}

// The vectorized decode against a scalar reference on random bit patterns (NaN, Inf, subnormals
// and every magnitude), lengths around its block size, and limits at the edges.
TEST(DType, DecodeMatchesAScalarReferenceOnRandomBits) {
  std::mt19937 rng(7);
  const float kLimits[] = {0.f, -0.f, 1.f, 65504.f, std::numeric_limits<float>::max(),
                           std::numeric_limits<float>::infinity(), -1.f, std::numeric_limits<float>::quiet_NaN()};
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (size_t count : {size_t{0}, size_t{1}, size_t{7}, size_t{2047}, size_t{2048}, size_t{2049}, size_t{5000}}) {
      for (float limit : kLimits) {
        for (int trial = 0; trial < 4; ++trial) {
          std::vector<uint8_t> wire(count * DTypeSize(dt));
          for (auto& b : wire) b = static_cast<uint8_t>(rng());
          if (trial == 0) {  // mostly small finite values: the first bad element lies deep inside
            std::vector<float> v(count);
            for (auto& x : v) x = std::ldexp(static_cast<float>(rng() % 2001) / 1000.f - 1.f, -static_cast<int>(rng() % 4));
            if (count > 0) v[rng() % count] = (rng() % 2) ? 1e30f : std::numeric_limits<float>::quiet_NaN();
            EncodeFromFloat(v.data(), count, dt, wire.data());
          }
          std::vector<float> expect(count);
          std::string expect_error;
          for (size_t i = 0; i < count; ++i) {
            if (dt == DType::kFloat32) std::memcpy(&expect[i], wire.data() + 4 * i, 4);
            else if (dt == DType::kBFloat16) {
              uint32_t bits = static_cast<uint32_t>(wire[2 * i] | (wire[2 * i + 1] << 8)) << 16;
              std::memcpy(&expect[i], &bits, 4);
            } else {
              Eigen::half h;
              std::memcpy(&h, wire.data() + 2 * i, 2);
              expect[i] = static_cast<float>(h);
            }
            if (expect_error.empty() && !(std::fabs(expect[i]) <= limit)) expect_error = absl::StrCat("element ", i);
          }
          std::vector<float> out(count);
          const absl::Status s = DecodeToFloat(wire.data(), dt, count, out.data(), limit);
          if (expect_error.empty()) {
            ASSERT_TRUE(s.ok()) << s << " dtype " << DTypeName(dt) << " count " << count << " limit " << limit;
            for (size_t i = 0; i < count; ++i) {
              ASSERT_EQ(std::memcmp(&out[i], &expect[i], 4), 0) << i;
            }
          } else {
            ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << DTypeName(dt) << " " << count << " " << limit;
            EXPECT_TRUE(absl::EndsWith(s.message(), expect_error) || s.message().find(expect_error + " ") != std::string_view::npos)
                << s << " expected " << expect_error;
          }
        }
      }
    }
  }
}

TEST(Selection, MaxPoolAndTopK) {
  VectorF s(7);
  s << 0, 0, 5, 0, 0, 0, 1;
  const VectorF pooled = MaxPool1d(s, 3);
  EXPECT_EQ(pooled[1], 5);
  EXPECT_EQ(pooled[3], 5);
  EXPECT_EQ(pooled[4], 0);
  EXPECT_EQ(pooled[5], 1);
  EXPECT_EQ(TopK(s, 2), (std::vector<int32_t>{2, 6}));
}

TEST(Selection, RandomIsSeededDistinctAndSorted) {
  SelectionParams p;
  p.budget = 20;
  p.seed = 9;
  const auto a = SelectKeys(Selection::kRandom, 100, VectorF(), p);
  const auto b = SelectKeys(Selection::kRandom, 100, VectorF(), p);
  EXPECT_EQ(a, b);
  ASSERT_EQ(a.size(), 20u);
  EXPECT_TRUE(std::is_sorted(a.begin(), a.end()));
  EXPECT_EQ(std::adjacent_find(a.begin(), a.end()), a.end());
  p.seed = 10;
  EXPECT_NE(SelectKeys(Selection::kRandom, 100, VectorF(), p), a);
}

TEST(Method, NamesRoundTrip) {
  for (const MethodSpec& spec : AllMethods()) {
    ASSERT_TRUE(MethodFromName(spec.name).has_value());
    EXPECT_EQ(*MethodFromName(spec.name), spec.method);
  }
  EXPECT_FALSE(MethodFromName("nope").has_value());
}

TEST(ThreadPool, RunsEveryIndexOnce) {
  ThreadPool pool(3);
  std::vector<int> hits(1000, 0);
  pool.ParallelFor(1000, [&](int64_t i) { hits[i]++; });
  for (int h : hits) EXPECT_EQ(h, 1);
}

}  // namespace
}  // namespace kvcompact
