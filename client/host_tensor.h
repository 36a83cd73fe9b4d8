// A dense little-endian tensor in host memory: dtype, shape and bytes, either owned or borrowed
// (e.g. a view into a memory-mapped file, kept alive by `owner`).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace kvcompact::client {

struct HostTensor {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t bytes = 0;
  std::shared_ptr<const void> owner;  // keeps `data` valid

  int64_t elements() const;
  std::string ShapeString() const;
  // An owned copy of fp32 values (any dtype in).
  static HostTensor FromFloats(std::vector<float> values, std::vector<int64_t> shape);
  static HostTensor FromBytes(std::string bytes, DType dtype, std::vector<int64_t> shape);
  std::vector<float> ToFloats() const;  // decodes; NaN/Inf pass through unchecked here
};

}  // namespace kvcompact::client
