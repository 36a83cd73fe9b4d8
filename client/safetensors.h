// safetensors files: an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data.
// Reading memory-maps the file; tensors are views into the mapping.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/host_tensor.h"

namespace kvcompact::client {

struct TensorFile {
  std::map<std::string, HostTensor> tensors;
  std::map<std::string, std::vector<int32_t>> int32_tensors;  // 1-D I32 (e.g. kept token indices)
  std::map<std::string, std::string> metadata;
};

absl::StatusOr<TensorFile> ReadSafetensors(const std::string& path);
// The same from bytes in memory (`owner` keeps them alive for the tensors' views; `name` is for
// messages). Never trusts a length or shape: every offset is checked against `size`.
absl::StatusOr<TensorFile> ParseSafetensors(const uint8_t* base, size_t size, std::shared_ptr<const void> owner,
                                            const std::string& name);
absl::Status WriteSafetensors(const std::string& path, const TensorFile& file);

}  // namespace kvcompact::client
