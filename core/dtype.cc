#include "core/dtype.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

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

// Widens [begin, end) of `src` to fp32. bf16 is the top half of an fp32, so a shift; fp16 through
// the CPU's converter where it has one (F16C on x86-64-v3). Both loops vectorize.
void Widen(const void* src, DType dtype, size_t begin, size_t end, float* dst) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst + begin, static_cast<const float*>(src) + begin, (end - begin) * sizeof(float));
  } else if (dtype == DType::kBFloat16) {
    const uint16_t* in = static_cast<const uint16_t*>(src);
    for (size_t i = begin; i < end; ++i) {
      const uint32_t bits = static_cast<uint32_t>(in[i]) << 16;
      std::memcpy(dst + i, &bits, sizeof(bits));
    }
  } else {
    const uint16_t* in = static_cast<const uint16_t*>(src);
    size_t i = begin;
#if defined(__F16C__)
    for (; i + 8 <= end; i += 8) {
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
    }
#endif
    const Eigen::half* h = reinterpret_cast<const Eigen::half*>(in);
    for (; i < end; ++i) dst[i] = static_cast<float>(h[i]);
  }
}

// Whether some |dst[i]| in [begin, end) is over the limit or NaN: on the bits of |x|, which order
// like |x| with NaN above +Inf; both sides are non-negative as int32, so the compare vectorizes.
bool AnyOver(const float* dst, size_t begin, size_t end, int32_t limit_bits) {
  int32_t over = 0;
  for (size_t i = begin; i < end; ++i) {
    int32_t bits;
    std::memcpy(&bits, dst + i, sizeof(bits));
    over |= static_cast<int32_t>((bits & 0x7fffffff) > limit_bits);
  }
  return over != 0;
}

}  // namespace

absl::Status DecodeToFloat(const void* src, DType dtype, size_t count, float* dst, float max_abs) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError("unknown dtype");
  }
  // max_abs NaN or negative accepts nothing, as !(|x| <= max_abs) would.
  int32_t limit_bits = -1;
  if (max_abs >= 0) {
    std::memcpy(&limit_bits, &max_abs, sizeof(limit_bits));
    limit_bits &= 0x7fffffff;  // -0
  }
  // Blocks that stay in L1 between the widening and the check: one pass over memory.
  constexpr size_t kBlock = 2048;
  for (size_t begin = 0; begin < count; begin += kBlock) {
    const size_t end = std::min(count, begin + kBlock);
    Widen(src, dtype, begin, end, dst);
    if (!AnyOver(dst, begin, end, limit_bits)) continue;
    for (size_t i = begin; i < end; ++i) {  // the first offending element, for the message
      if (std::fabs(dst[i]) <= max_abs) continue;
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
