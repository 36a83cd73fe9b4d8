// Element types on the wire and their conversion to and from fp32 (all math is fp32 or better).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

namespace kvcompact {

enum class DType : int { kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

size_t DTypeSize(DType dtype);
std::string_view DTypeName(DType dtype);
bool ParseDTypeName(std::string_view name, DType* out);  // "F32", "F16", "BF16" (safetensors names)

// Converts `count` elements at `src` (little-endian, `dtype`) into fp32. Fails on NaN/Inf, and on
// magnitudes over `max_abs`, so that bad input is reported where it enters, not as a poisoned fit
// later.
absl::Status DecodeToFloat(const void* src, DType dtype, size_t count, float* dst,
                           float max_abs = std::numeric_limits<float>::max());
// Converts fp32 into `dtype` with round-to-nearest-even.
void EncodeFromFloat(const float* src, size_t count, DType dtype, void* dst);
// In place: each value as the server's decode of it sent in `dtype` yields it (tests, benchmarks).
void RoundThrough(std::vector<float>& values, DType dtype);

}  // namespace kvcompact
