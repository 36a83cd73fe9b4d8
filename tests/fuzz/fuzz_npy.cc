// A .npy file as the CLI reads it: header parsing, shape and size checks, fp16/fp32 decoding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "client/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<kvcompact::client::HostTensor> t =
      kvcompact::client::ParseNpy(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  if (!t.ok()) return 0;
  if (static_cast<uint64_t>(t->elements()) * kvcompact::DTypeSize(t->dtype) != t->bytes) __builtin_trap();
  if (t->bytes <= (1u << 20)) (void)t->ToFloats();
  return 0;
}
