// NumPy .npy files (format versions 1-3): little-endian float32 ('<f4') or float16 ('<f2'),
// C order. NumPy has no bfloat16, so bf16 caches travel as safetensors.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "client/host_tensor.h"

namespace kvcompact::client {

absl::StatusOr<HostTensor> ReadNpy(const std::string& path);
// The same from the file's bytes (`name` is for messages).
absl::StatusOr<HostTensor> ParseNpy(const std::string& bytes, const std::string& name);
absl::Status WriteNpy(const std::string& path, const HostTensor& tensor);

}  // namespace kvcompact::client
