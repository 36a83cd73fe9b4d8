// A cache file as the CLI reads it: safetensors parsing, the layer layout, shape checks, dtype
// decoding and the client's chunking into request messages.
#include <cstddef>
#include <cstdint>

#include "client/cache_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvcompact::client;
  auto owned = std::make_shared<std::string>(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<TensorFile> file =
      ParseSafetensors(reinterpret_cast<const uint8_t*>(owned->data()), owned->size(), owned, "fuzz");
  if (!file.ok()) return 0;
  for (const auto& [name, tensor] : file->tensors) {
    if (tensor.bytes <= (1u << 20)) (void)tensor.ToFloats();
  }
  absl::StatusOr<CacheInput> cache = CacheFromTensors(*std::move(file), "fuzz");
  if (!cache.ok()) return 0;
  for (const LayerInput& layer : cache->layers) {
    if (layer.keys.bytes + layer.values.bytes > (4u << 20)) continue;
    std::vector<kvcompact::v1::CompactRequest> chunks = ChunkLayer(layer, 4096);
    if (chunks.empty() || !chunks.back().has_layer_end()) __builtin_trap();
  }
  return 0;
}
