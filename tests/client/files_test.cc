// safetensors and .npy readers/writers, and the cache layout the CLI reads.
#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "client/cache_files.h"
#include "client/npy.h"
#include "client/safetensors.h"

namespace kvcompact::client {
namespace {

std::string Temp(const std::string& name) { return ::testing::TempDir() + "/" + name; }

HostTensor Iota(std::vector<int64_t> shape, float start = 0) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = start + 0.5f * i;
  return HostTensor::FromFloats(std::move(v), std::move(shape));
}

TEST(Safetensors, RoundTripsTensorsIndicesAndMetadata) {
  TensorFile f;
  f.tensors["a"] = Iota({2, 3});
  std::string half(8, '\0');
  f.tensors["b"] = HostTensor::FromBytes(half, DType::kBFloat16, {4});
  f.int32_tensors["idx"] = {3, 1, 4};
  f.metadata["logit_scale"] = "0.125";
  ASSERT_TRUE(WriteSafetensors(Temp("rt.safetensors"), f).ok());
  auto back = ReadSafetensors(Temp("rt.safetensors"));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->tensors.at("a").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(back->tensors.at("a").ToFloats(), f.tensors["a"].ToFloats());
  EXPECT_EQ(back->tensors.at("b").dtype, DType::kBFloat16);
  EXPECT_EQ(back->int32_tensors.at("idx"), (std::vector<int32_t>{3, 1, 4}));
  EXPECT_EQ(back->metadata.at("logit_scale"), "0.125");
}

TEST(Safetensors, MalformedFilesGiveClearErrors) {
  EXPECT_EQ(ReadSafetensors(Temp("missing.safetensors")).status().code(), absl::StatusCode::kNotFound);
  {
    std::ofstream out(Temp("short.safetensors"), std::ios::binary);
    out << "abc";
  }
  EXPECT_NE(ReadSafetensors(Temp("short.safetensors")).status().message().find("too short"), std::string::npos);
  {
    std::ofstream out(Temp("badlen.safetensors"), std::ios::binary);
    const uint64_t len = 1 << 30;
    out.write(reinterpret_cast<const char*>(&len), 8);
    out << "{}";
  }
  EXPECT_NE(ReadSafetensors(Temp("badlen.safetensors")).status().message().find("exceeds the file"), std::string::npos);
  {
    const std::string header = R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}})";
    std::ofstream out(Temp("badoff.safetensors"), std::ios::binary);
    const uint64_t len = header.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out << header << std::string(8, '\0');
  }
  EXPECT_NE(ReadSafetensors(Temp("badoff.safetensors")).status().message().find("do not match shape [4]"), std::string::npos);
}

TEST(Npy, RoundTripsFloat32AndFloat16) {
  ASSERT_TRUE(WriteNpy(Temp("a.npy"), Iota({3, 2, 5}, 1)).ok());
  auto a = ReadNpy(Temp("a.npy"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->shape, (std::vector<int64_t>{3, 2, 5}));
  EXPECT_EQ(a->ToFloats(), Iota({3, 2, 5}, 1).ToFloats());
  std::string half(2 * 6, '\0');
  ASSERT_TRUE(WriteNpy(Temp("h.npy"), HostTensor::FromBytes(half, DType::kFloat16, {6})).ok());
  auto h = ReadNpy(Temp("h.npy"));
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->dtype, DType::kFloat16);
  EXPECT_EQ(h->shape, (std::vector<int64_t>{6}));
  EXPECT_FALSE(WriteNpy(Temp("b.npy"), HostTensor::FromBytes(half, DType::kBFloat16, {6})).ok());
}

TEST(Npy, ReadsWhatNumpyWritesAndRejectsTheRest) {
  // A file as numpy 1.x writes it for np.zeros((2, 3), '<f4'): 118-byte padded header.
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  header.append(128 - 10 - header.size() - 1, ' ');
  header += '\n';
  {
    std::ofstream out(Temp("np.npy"), std::ios::binary);
    out.write("\x93NUMPY\x01\x00", 8);
    const uint16_t len = static_cast<uint16_t>(header.size());
    out.write(reinterpret_cast<const char*>(&len), 2);
    out << header << std::string(24, '\0');
  }
  auto t = ReadNpy(Temp("np.npy"));
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
  std::string f8 = header;
  f8.replace(f8.find("<f4"), 3, "<f8");
  {
    std::ofstream out(Temp("f8.npy"), std::ios::binary);
    out.write("\x93NUMPY\x01\x00", 8);
    const uint16_t len = static_cast<uint16_t>(f8.size());
    out.write(reinterpret_cast<const char*>(&len), 2);
    out << f8 << std::string(48, '\0');
  }
  EXPECT_NE(ReadNpy(Temp("f8.npy")).status().message().find("'<f8' is not <f4 or <f2"), std::string::npos);
}

TEST(CacheFiles, NpyDirectoryAndSafetensorsLoadTheSameCache) {
  CacheInput cache;
  for (uint32_t l = 0; l < 2; ++l) {
    LayerInput in;
    in.layer = l;
    in.keys = Iota({2, 8, 4}, l);
    in.values = Iota({2, 8, 3}, 10 + l);
    in.queries = Iota({2, 5, 4}, 20 + l);
    cache.layers.push_back(in);
  }
  cache.logit_scale = 0.25f;
  ASSERT_TRUE(SaveCache(Temp("cache.safetensors"), cache).ok());
  const std::string dir = Temp("cache_npy");
  std::filesystem::create_directories(dir);
  for (const LayerInput& l : cache.layers) {
    const std::string p = dir + "/layers." + std::to_string(l.layer) + ".";
    ASSERT_TRUE(WriteNpy(p + "keys.npy", l.keys).ok());
    ASSERT_TRUE(WriteNpy(p + "values.npy", l.values).ok());
    ASSERT_TRUE(WriteNpy(p + "queries.npy", *l.queries).ok());
  }
  auto a = LoadCache(Temp("cache.safetensors"));
  auto b = LoadCache(dir);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->num_layers, 2u);
  EXPECT_EQ(a->num_kv_heads, 2u);
  EXPECT_EQ(a->head_dim, 4u);
  EXPECT_EQ(a->value_dim, 3u);
  EXPECT_FLOAT_EQ(a->logit_scale, 0.25f);
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(a->layers[l].keys.ToFloats(), b->layers[l].keys.ToFloats());
    EXPECT_EQ(a->layers[l].queries->ToFloats(), b->layers[l].queries->ToFloats());
  }
}

TEST(CacheFiles, InconsistentShapesAreRejected) {
  CacheInput cache;
  LayerInput in;
  in.keys = Iota({2, 8, 4});
  in.values = Iota({2, 7, 4});  // T differs
  cache.layers.push_back(in);
  ASSERT_TRUE(SaveCache(Temp("bad.safetensors"), cache).ok());
  auto loaded = LoadCache(Temp("bad.safetensors"));
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(loaded.status().message().find("values must be [kv_heads, T, value_dim] matching keys [2, 8, 4]"),
            std::string::npos) << loaded.status();
}

TEST(ChunkLayer, EveryMessageStaysUnderTheLimitAndCoversTheLayer) {
  LayerInput in;
  in.keys = Iota({3, 1000, 64});
  in.values = Iota({3, 1000, 64});
  in.queries = Iota({3, 700, 64});
  const uint64_t limit = 100 << 10;
  const auto chunks = ChunkLayer(in, limit);
  int64_t kv_rows = 0, q_rows = 0;
  for (const auto& c : chunks) {
    EXPECT_LE(c.ByteSizeLong(), limit);
    if (c.has_kv()) kv_rows += (c.kv().head_end() - c.kv().head_begin()) * c.kv().keys().shape(1);
    if (c.has_queries()) q_rows += (c.queries().head_end() - c.queries().head_begin()) * c.queries().queries().shape(1);
  }
  EXPECT_EQ(kv_rows, 3 * 1000);
  EXPECT_EQ(q_rows, 3 * 700);
  EXPECT_TRUE(chunks.back().has_layer_end());
}

}  // namespace
}  // namespace kvcompact::client

namespace kvcompact::client {
namespace {

// Inputs the fuzz targets found: an empty tensor has no data pointer; a view into a file may be
// misaligned for its 16-bit dtype; shapes whose product overflows must not pass the size check.
TEST(FuzzRegressions, EmptyAndMisalignedTensorsAndOverflowingShapes) {
  HostTensor empty;
  empty.shape = {0, 4};
  EXPECT_TRUE(empty.ToFloats().empty());

  auto bytes = std::make_shared<std::string>("\x00\x00\x3c\x00\x40", 5);  // f16 1.0, 2.0 at offset 1
  HostTensor misaligned;
  misaligned.dtype = DType::kFloat16;
  misaligned.shape = {2};
  misaligned.data = reinterpret_cast<const uint8_t*>(bytes->data()) + 1;
  misaligned.bytes = 4;
  misaligned.owner = bytes;
  EXPECT_EQ(misaligned.ToFloats(), (std::vector<float>{1.0f, 2.0f}));

  const std::string header = R"({"t":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})";
  std::string file(8, '\0');
  const uint64_t len = header.size();
  std::memcpy(file.data(), &len, 8);
  file += header;
  auto owned = std::make_shared<std::string>(file);
  auto parsed = ParseSafetensors(reinterpret_cast<const uint8_t*>(owned->data()), owned->size(), owned, "t");
  EXPECT_FALSE(parsed.ok());
  std::string npy = std::string("\x93NUMPY\x01\x00", 8);
  const std::string npy_header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }";
  npy += static_cast<char>(npy_header.size()) + std::string(1, '\0') + npy_header;
  EXPECT_FALSE(ParseNpy(npy, "t").ok());

  TensorFile huge_layer;
  huge_layer.tensors["layers.99999999999999999999.keys"] = HostTensor::FromFloats({1, 2}, {1, 1, 2});
  EXPECT_FALSE(CacheFromTensors(huge_layer, "t").ok());
}

}  // namespace
}  // namespace kvcompact::client
