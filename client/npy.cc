#include "client/npy.h"

#include <cstring>
#include <fstream>
#include <iterator>
#include <regex>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvcompact::client {

absl::StatusOr<HostTensor> ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ParseNpy(bytes, path);
}

absl::StatusOr<HostTensor> ParseNpy(const std::string& bytes, const std::string& path) {
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a .npy file"));
  }
  const int major = static_cast<uint8_t>(bytes[6]);
  size_t header_len = 0, offset = 0;
  if (major == 1) {
    header_len = static_cast<uint8_t>(bytes[8]) | (static_cast<uint8_t>(bytes[9]) << 8);
    offset = 10;
  } else if ((major == 2 || major == 3) && bytes.size() >= 12) {
    uint32_t len32 = 0;
    std::memcpy(&len32, bytes.data() + 8, 4);
    header_len = len32;
    offset = 12;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(path, ": unsupported .npy version ", major));
  }
  if (offset + header_len > bytes.size()) return absl::InvalidArgumentError(absl::StrCat(path, ": truncated header"));
  const std::string header = bytes.substr(offset, header_len);
  std::smatch m;
  if (!std::regex_search(header, m, std::regex("'descr':\\s*'([^']*)'"))) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header has no descr"));
  }
  HostTensor t;
  const std::string descr = m[1];
  if (descr == "<f4") t.dtype = DType::kFloat32;
  else if (descr == "<f2") t.dtype = DType::kFloat16;
  else return absl::InvalidArgumentError(absl::StrCat(path, ": dtype '", descr, "' is not <f4 or <f2"));
  if (std::regex_search(header, std::regex("'fortran_order':\\s*True"))) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": Fortran order is not supported; save with C order"));
  }
  if (!std::regex_search(header, m, std::regex("'shape':\\s*\\(([^)]*)\\)"))) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header has no shape"));
  }
  const size_t data_at = offset + header_len;
  const uint64_t data_size = bytes.size() - data_at;
  uint64_t elements = 1;  // capped above the data size: no overflow
  for (absl::string_view part : absl::StrSplit(std::string(m[1]), ',', absl::SkipWhitespace())) {
    int64_t dim = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &dim) || dim < 0 ||
        static_cast<uint64_t>(dim) > data_size) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": bad shape"));
    }
    elements = dim == 0 ? 0 : (elements > data_size / dim ? data_size + 1 : elements * dim);
    t.shape.push_back(dim);
  }
  const uint64_t want = elements * DTypeSize(t.dtype);
  if (bytes.size() - data_at != want) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", bytes.size() - data_at, " data bytes, shape ",
                                                   t.ShapeString(), " needs ", want));
  }
  return HostTensor::FromBytes(bytes.substr(data_at), t.dtype, t.shape);
}

absl::Status WriteNpy(const std::string& path, const HostTensor& t) {
  if (t.dtype == DType::kBFloat16) return absl::InvalidArgumentError("NumPy has no bfloat16; use safetensors");
  std::string shape;
  for (int64_t s : t.shape) absl::StrAppend(&shape, s, ",");
  if (t.shape.size() > 1) shape.pop_back();
  std::string header = absl::StrCat("{'descr': '", t.dtype == DType::kFloat32 ? "<f4" : "<f2",
                                    "', 'fortran_order': False, 'shape': (", shape, "), }");
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot open for writing"));
  const uint16_t len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(&len), 2);
  out << header;
  out.write(reinterpret_cast<const char*>(t.data), static_cast<std::streamsize>(t.bytes));
  return out ? absl::OkStatus() : absl::DataLossError(absl::StrCat(path, ": write failed"));
}

}  // namespace kvcompact::client
