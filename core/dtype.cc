#include "core/dtype.h"

#include <cmath>
#include <cstring>

#include <Eigen/Core>

#include "absl/strings/str_cat.h"

namespace kvcompact {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
  }
  return 0;
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "F32";
    case DType::kFloat16: return "F16";
    case DType::kBFloat16: return "BF16";
  }
  return "?";
}

bool ParseDTypeName(std::string_view name, DType* out) {
  if (name == "F32") { *out = DType::kFloat32; return true; }
  if (name == "F16") { *out = DType::kFloat16; return true; }
  if (name == "BF16") { *out = DType::kBFloat16; return true; }
  return false;
}

namespace {
template <typename T>
void Widen(const void* src, size_t count, float* dst) {
  const T* in = static_cast<const T*>(src);
  for (size_t i = 0; i < count; ++i) dst[i] = static_cast<float>(in[i]);
}
}  // namespace

absl::Status DecodeToFloat(const void* src, DType dtype, size_t count, float* dst, float max_abs) {
  switch (dtype) {
    case DType::kFloat32: std::memcpy(dst, src, count * sizeof(float)); break;
    case DType::kFloat16: Widen<Eigen::half>(src, count, dst); break;
    case DType::kBFloat16: Widen<Eigen::bfloat16>(src, count, dst); break;
    default: return absl::InvalidArgumentError("unknown dtype");
  }
  // One pass over each element (the sum trick would miss +Inf and -Inf cancelling); the test is
  // false for NaN too.
  for (size_t i = 0; i < count; ++i) {
    if (!(std::fabs(dst[i]) <= max_abs)) {
      if (!std::isfinite(dst[i])) {
        return absl::InvalidArgumentError(absl::StrCat("non-finite value (", dst[i], ") at element ", i));
      }
      return absl::InvalidArgumentError(absl::StrCat("|", dst[i], "| at element ", i, " is over ", max_abs,
                                                     ", the largest magnitude accepted"));
    }
  }
  return absl::OkStatus();
}

void EncodeFromFloat(const float* src, size_t count, DType dtype, void* dst) {
  switch (dtype) {
    case DType::kFloat32: std::memcpy(dst, src, count * sizeof(float)); return;
    case DType::kFloat16: {
      auto* out = static_cast<Eigen::half*>(dst);
      for (size_t i = 0; i < count; ++i) out[i] = Eigen::half(src[i]);
      return;
    }
    case DType::kBFloat16: {
      auto* out = static_cast<Eigen::bfloat16*>(dst);
      for (size_t i = 0; i < count; ++i) out[i] = Eigen::bfloat16(src[i]);
      return;
    }
  }
}

void RoundThrough(std::vector<float>& values, DType dtype) {
  if (dtype == DType::kFloat32) return;
  std::vector<uint8_t> wire(values.size() * DTypeSize(dtype));
  EncodeFromFloat(values.data(), values.size(), dtype, wire.data());
  // Every value decodes: the encoder rounds to the nearest representable, Inf for overflow.
  (void)DecodeToFloat(wire.data(), dtype, values.size(), values.data(), std::numeric_limits<float>::infinity());
}

}  // namespace kvcompact
