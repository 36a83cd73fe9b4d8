#include "client/cache_files.h"

#include <filesystem>
#include <regex>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "client/npy.h"
#include "client/safetensors.h"

namespace kvcompact::client {
namespace {

absl::StatusOr<TensorFile> ReadNpyDirectory(const std::string& dir) {
  TensorFile file;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".npy") continue;
    auto t = ReadNpy(entry.path().string());
    if (!t.ok()) return t.status();
    file.tensors.emplace(entry.path().stem().string(), *std::move(t));
  }
  return file;
}

}  // namespace

absl::StatusOr<CacheInput> LoadCache(const std::string& path) {
  absl::StatusOr<TensorFile> file = std::filesystem::is_directory(path) ? ReadNpyDirectory(path) : ReadSafetensors(path);
  if (!file.ok()) return file.status();
  return CacheFromTensors(*std::move(file), path);
}

absl::StatusOr<CacheInput> CacheFromTensors(TensorFile file_in, const std::string& path) {
  TensorFile* file = &file_in;
  CacheInput cache;
  std::map<uint32_t, LayerInput> layers;
  const std::regex name_re(R"(layers\.(\d+)\.(keys|values|queries|bias))");
  for (auto& [name, tensor] : file->tensors) {
    std::smatch m;
    uint32_t layer = 0;
    if (!std::regex_match(name, m, name_re)) continue;
    if (!absl::SimpleAtoi(std::string(m[1]), &layer) || layer >= (1u << 20)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": layer number of '", name, "' is out of range"));
    }
    LayerInput& in = layers[layer];
    in.layer = layer;
    if (m[2] == "keys") in.keys = tensor;
    else if (m[2] == "values") in.values = tensor;
    else if (m[2] == "queries") in.queries = tensor;
    else in.bias = tensor;
  }
  if (layers.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no tensors named layers.<L>.keys"));
  for (auto& [index, layer] : layers) {
    if (layer.keys.shape.empty() || layer.values.shape.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": layer ", index, " needs both keys and values"));
    }
    if (absl::Status s = ValidateLayerInput(layer); !s.ok()) return s;
    cache.layers.push_back(std::move(layer));
  }
  const LayerInput& first = cache.layers.front();
  cache.num_layers = cache.layers.back().layer + 1;
  cache.num_kv_heads = static_cast<uint32_t>(first.keys.shape[0]);
  cache.head_dim = static_cast<uint32_t>(first.keys.shape[2]);
  cache.value_dim = static_cast<uint32_t>(first.values.shape[2]);
  if (auto it = file->metadata.find("logit_scale"); it != file->metadata.end()) {
    if (!absl::SimpleAtof(it->second, &cache.logit_scale)) return absl::InvalidArgumentError("metadata logit_scale is not a number");
  }
  if (auto it = file->metadata.find("query_heads_per_kv_head"); it != file->metadata.end()) {
    absl::SimpleAtoi(it->second, &cache.query_heads_per_kv_head);
  }
  return cache;
}

uint64_t CompactedPayloadBytes(const CompactOutcome& outcome) {
  uint64_t bytes = 0;
  for (const CompactedLayer& layer : outcome.layers) {
    for (const CompactedHead& head : layer.heads) bytes += head.keys.size() + head.values.size() + 4 * head.beta.size();
  }
  return bytes;
}

namespace {

// One layer's heads back to back with CSR offsets (the packed layout).
void AddPackedLayer(const CompactedLayer& layer, const CompactedFileInfo& info, TensorFile* file) {
  std::string keys, values;
  std::vector<float> beta;
  std::vector<int32_t> offsets = {0}, indices;
  DType dtype = DType::kFloat32;
  for (const CompactedHead& head : layer.heads) {
    keys += head.keys;
    values += head.values;
    beta.insert(beta.end(), head.beta.begin(), head.beta.end());
    indices.insert(indices.end(), head.indices.begin(), head.indices.end());
    offsets.push_back(offsets.back() + static_cast<int32_t>(head.tokens));
    dtype = head.dtype;
  }
  const int64_t rows = offsets.back();
  const std::string prefix = absl::StrCat("layers.", layer.layer, ".");
  file->tensors[prefix + "keys"] = HostTensor::FromBytes(std::move(keys), dtype, {rows, info.head_dim});
  file->tensors[prefix + "values"] = HostTensor::FromBytes(std::move(values), dtype, {rows, info.value_dim});
  file->tensors[prefix + "beta"] = HostTensor::FromFloats(std::move(beta), {rows});
  file->int32_tensors[prefix + "offsets"] = std::move(offsets);
  if (static_cast<int64_t>(indices.size()) == rows && rows > 0) file->int32_tensors[prefix + "indices"] = std::move(indices);
}

}  // namespace

absl::Status SaveCompacted(const std::string& path, const CompactOutcome& outcome, const CompactedFileInfo& info) {
  TensorFile file;
  for (const CompactedLayer& layer : outcome.layers) {
    if (info.packed) {
      AddPackedLayer(layer, info, &file);
      continue;
    }
    for (size_t h = 0; h < layer.heads.size(); ++h) {
      const CompactedHead& head = layer.heads[h];
      const int64_t t = static_cast<int64_t>(head.tokens);
      const std::string prefix = absl::StrCat("layers.", layer.layer, ".heads.", h, ".");
      file.tensors[prefix + "keys"] = HostTensor::FromBytes(head.keys, head.dtype, {t, info.head_dim});
      file.tensors[prefix + "values"] = HostTensor::FromBytes(head.values, head.dtype, {t, info.value_dim});
      file.tensors[prefix + "beta"] = HostTensor::FromFloats(head.beta, {t});
      if (!head.indices.empty()) file.int32_tensors[prefix + "indices"] = std::vector<int32_t>(head.indices.begin(), head.indices.end());
    }
  }
  file.metadata["format"] = info.packed ? "kvcompact.compacted.packed.v1" : "kvcompact.compacted.v1";
  file.metadata["method"] = info.method;
  file.metadata["logit_scale"] = absl::StrCat(info.logit_scale);
  file.metadata["num_layers"] = absl::StrCat(info.num_layers);
  file.metadata["num_kv_heads"] = absl::StrCat(info.num_kv_heads);
  for (size_t l = 0; l < info.tokens_in.size(); ++l) {
    if (info.tokens_in[l]) file.metadata[absl::StrCat("layers.", l, ".tokens_in")] = absl::StrCat(info.tokens_in[l]);
  }
  return WriteSafetensors(path, file);
}

absl::Status SaveCache(const std::string& path, const CacheInput& cache) {
  TensorFile file;
  for (const LayerInput& l : cache.layers) {
    const std::string p = absl::StrCat("layers.", l.layer, ".");
    file.tensors[p + "keys"] = l.keys;
    file.tensors[p + "values"] = l.values;
    if (l.queries) file.tensors[p + "queries"] = *l.queries;
    if (l.bias) file.tensors[p + "bias"] = *l.bias;
  }
  if (cache.logit_scale > 0) file.metadata["logit_scale"] = absl::StrCat(cache.logit_scale);
  if (cache.query_heads_per_kv_head) file.metadata["query_heads_per_kv_head"] = absl::StrCat(cache.query_heads_per_kv_head);
  return WriteSafetensors(path, file);
}

}  // namespace kvcompact::client
