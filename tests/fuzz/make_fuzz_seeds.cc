// Writes the seed corpus of the fuzz targets into DIR/<target>/ from small generated layers,
// through the same client code (chunking, file writers) that produces real inputs.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "client/cache_files.h"
#include "client/npy.h"
#include "core/synthetic.h"
#include "tests/fuzz/stream_codec.h"

namespace kvcompact {
namespace {

namespace fs = std::filesystem;

void WriteFile(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

client::LayerInput SmallLayer(int32_t layer, int64_t tokens, int64_t queries, DType dtype, bool bias) {
  SyntheticShape shape{2, tokens, queries, 8, 8};
  client::LayerInput in = client::ToLayerInput(MakeSyntheticLayer(shape, 7, layer), dtype);
  if (queries == 0) in.queries.reset();
  if (bias) in.bias = client::HostTensor::FromFloats(std::vector<float>(2 * tokens, -0.5f), {2, tokens});
  return in;
}

std::string Stream(v1::StreamHeader header, const std::vector<client::LayerInput>& layers, uint64_t chunk_bytes) {
  std::vector<v1::CompactRequest> requests(1);
  header.mutable_geometry()->set_num_layers(static_cast<uint32_t>(layers.size()));
  header.mutable_geometry()->set_num_kv_heads(2);
  header.mutable_geometry()->set_head_dim(8);
  *requests[0].mutable_header() = header;
  for (const client::LayerInput& l : layers) {
    for (v1::CompactRequest& r : client::ChunkLayer(l, chunk_bytes)) requests.push_back(std::move(r));
  }
  return fuzz::EncodeStream(requests);
}

v1::StreamHeader Header(v1::Method method, double ratio) {
  v1::StreamHeader h;
  h.mutable_options()->set_method(method);
  h.mutable_options()->mutable_budget()->set_ratio(ratio);
  h.mutable_options()->set_holdout_fraction(0.2f);
  h.mutable_options()->set_return_indices(true);
  return h;
}

int Run(const fs::path& dir) {
  const fs::path stream = dir / "fuzz_compact_stream", st = dir / "fuzz_safetensors", npy = dir / "fuzz_npy";
  for (const fs::path& d : {stream, st, npy}) fs::create_directories(d);
  const auto l32 = SmallLayer(0, 48, 16, DType::kFloat32, false);
  WriteFile(stream / "am_f32", Stream(Header(v1::METHOD_AM_HIGHEST_ATTENTION, 4), {l32}, 512));
  WriteFile(stream / "h2o_bf16_two_layers",
            Stream(Header(v1::METHOD_H2O, 3), {SmallLayer(0, 32, 8, DType::kBFloat16, false),
                                               SmallLayer(1, 32, 8, DType::kBFloat16, false)}, 1 << 20));
  WriteFile(stream / "streaming_no_queries", Stream(Header(v1::METHOD_STREAMING_LLM, 4), {SmallLayer(0, 40, 0, DType::kFloat16, false)}, 256));
  v1::StreamHeader omp = Header(v1::METHOD_AM_OMP_FAST, 4);
  omp.mutable_options()->set_chunk_tokens(24);
  WriteFile(stream / "omp_chunked_bias", Stream(omp, {SmallLayer(0, 48, 16, DType::kFloat32, true)}, 1024));
  v1::StreamHeader sens = Header(v1::METHOD_AM_HIGHEST_ATTENTION, 4);
  sens.mutable_options()->mutable_budget()->mutable_allocation()->set_rule(v1::Allocation::RULE_SENSITIVITY);
  sens.mutable_options()->mutable_budget()->mutable_allocation()->set_ratio(4);
  WriteFile(stream / "sensitivity", Stream(sens, {l32}, 1 << 20));
  v1::StreamHeader ragged = Header(v1::METHOD_AM_HIGHEST_ATTENTION, 4);
  ragged.mutable_options()->mutable_budget()->mutable_per_head()->add_tokens(5);
  ragged.mutable_options()->mutable_budget()->mutable_per_head()->add_tokens(11);
  ragged.mutable_options()->set_output_dtype(v1::DTYPE_FP16);
  WriteFile(stream / "ragged_f16_out", Stream(ragged, {l32}, 700));

  client::CacheInput cache;
  cache.layers = {SmallLayer(0, 16, 8, DType::kFloat32, false), SmallLayer(1, 16, 8, DType::kBFloat16, true)};
  cache.num_layers = 2;
  cache.num_kv_heads = 2;
  cache.head_dim = cache.value_dim = 8;
  cache.logit_scale = 0.35f;
  const fs::path tmp = dir / "tmp.safetensors";
  if (absl::Status s = client::SaveCache(tmp.string(), cache); !s.ok()) {
    fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  WriteFile(st / "cache_two_layers", ReadFile(tmp));
  fs::remove(tmp);
  for (DType dtype : {DType::kFloat32, DType::kFloat16}) {
    const fs::path f = dir / "tmp.npy";
    client::HostTensor t = client::ToLayerInput(MakeSyntheticLayer({1, 6, 0, 4, 4}, 3), dtype).keys;
    if (!client::WriteNpy(f.string(), t).ok()) return 1;
    WriteFile(npy / (dtype == DType::kFloat32 ? "keys_f32" : "keys_f16"), ReadFile(f));
    fs::remove(f);
  }
  printf("seeds written under %s\n", dir.c_str());
  return 0;
}

}  // namespace
}  // namespace kvcompact

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: make_fuzz_seeds DIR\n");
    return 2;
  }
  return kvcompact::Run(argv[1]);
}
