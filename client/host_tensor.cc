#include "client/host_tensor.h"

#include <cstring>

#include <Eigen/Core>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kvcompact::client {

int64_t HostTensor::elements() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

std::string HostTensor::ShapeString() const { return absl::StrCat("[", absl::StrJoin(shape, ", "), "]"); }

HostTensor HostTensor::FromFloats(std::vector<float> values, std::vector<int64_t> shape) {
  auto owned = std::make_shared<std::vector<float>>(std::move(values));
  HostTensor t;
  t.dtype = DType::kFloat32;
  t.shape = std::move(shape);
  t.data = reinterpret_cast<const uint8_t*>(owned->data());
  t.bytes = owned->size() * sizeof(float);
  t.owner = owned;
  return t;
}

HostTensor HostTensor::FromBytes(std::string bytes, DType dtype, std::vector<int64_t> shape) {
  auto owned = std::make_shared<std::string>(std::move(bytes));
  HostTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data = reinterpret_cast<const uint8_t*>(owned->data());
  t.bytes = owned->size();
  t.owner = owned;
  return t;
}

std::vector<float> HostTensor::ToFloats() const {
  const size_t n = static_cast<size_t>(elements());
  std::vector<float> out(n);
  if (n == 0) return out;
  // Views into files need not be aligned for their dtype: read the 16-bit types bytewise.
  auto half_bits = [this](size_t i) {
    uint16_t bits;
    std::memcpy(&bits, data + 2 * i, 2);
    return bits;
  };
  switch (dtype) {
    case DType::kFloat32: std::memcpy(out.data(), data, n * 4); break;
    case DType::kFloat16:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(half_bits(i)));
      break;
    case DType::kBFloat16:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(half_bits(i)));
      break;
  }
  return out;
}

}  // namespace kvcompact::client
