#include "client/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"

namespace kvcompact::client {
namespace {

struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr) munmap(addr, size);
  }
};

}  // namespace

absl::StatusOr<TensorFile> ReadSafetensors(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": ", std::strerror(errno)));
  struct stat st {};
  fstat(fd, &st);
  auto map = std::make_shared<Mapping>();
  map->size = static_cast<size_t>(st.st_size);
  if (map->size < 8) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": too short for a safetensors file"));
  }
  map->addr = mmap(nullptr, map->size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map->addr == MAP_FAILED) {
    map->addr = nullptr;
    return absl::InternalError(absl::StrCat(path, ": mmap failed"));
  }
  return ParseSafetensors(static_cast<const uint8_t*>(map->addr), map->size, map, path);
}

absl::StatusOr<TensorFile> ParseSafetensors(const uint8_t* base, size_t size, std::shared_ptr<const void> owner,
                                            const std::string& path) {
  if (size < 8) return absl::InvalidArgumentError(absl::StrCat(path, ": too short for a safetensors file"));
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);
  if (header_len > size - 8 || header_len > (100u << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_len, " exceeds the file"));
  }
  const nlohmann::json header = nlohmann::json::parse(base + 8, base + 8 + header_len, nullptr, false);
  if (header.is_discarded() || !header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not a JSON object"));
  }
  const uint8_t* data = base + 8 + header_len;
  const size_t data_size = size - 8 - header_len;
  TensorFile file;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ is not an object"));
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (m->is_string()) file.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const nlohmann::json& e = *it;
    const std::string where = absl::StrCat(path, ": tensor '", it.key(), "'");
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets") ||
        !e["dtype"].is_string() || !e["shape"].is_array() || !e["data_offsets"].is_array() ||
        e["data_offsets"].size() != 2 || !e["data_offsets"][0].is_number_unsigned() ||
        !e["data_offsets"][1].is_number_unsigned()) {
      return absl::InvalidArgumentError(absl::StrCat(where, " has a malformed entry"));
    }
    // Dimensions: unsigned and with a product that fits the file (no overflow on the way).
    std::vector<int64_t> shape;
    uint64_t elements = 1;
    for (const auto& d : e["shape"]) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > data_size) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": bad shape"));
      }
      const uint64_t dim = d.get<uint64_t>();
      elements = dim == 0 ? 0 : (elements > data_size / dim ? data_size + 1 : elements * dim);
      shape.push_back(static_cast<int64_t>(dim));
    }
    const uint64_t begin = e["data_offsets"][0].get<uint64_t>(), end = e["data_offsets"][1].get<uint64_t>();
    if (e["dtype"] == "I32" && shape.size() == 1) {
      if (begin > end || end > data_size || end - begin != elements * 4) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": data_offsets do not match its shape"));
      }
      std::vector<int32_t> v(elements);
      if (elements > 0) std::memcpy(v.data(), data + begin, elements * 4);
      file.int32_tensors.emplace(it.key(), std::move(v));
      continue;
    }
    HostTensor t;
    if (!ParseDTypeName(e["dtype"].get<std::string>(), &t.dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": dtype ", e["dtype"].get<std::string>(),
                                                     " is not F32, F16 or BF16"));
    }
    t.shape = std::move(shape);
    if (begin > end || end > data_size || elements > data_size || end - begin != elements * DTypeSize(t.dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": data_offsets [", begin, ", ", end,
                                                     ") do not match shape ", t.ShapeString(), " within the file"));
    }
    t.data = data + begin;
    t.bytes = end - begin;
    t.owner = owner;
    file.tensors.emplace(it.key(), std::move(t));
  }
  return file;
}

absl::Status WriteSafetensors(const std::string& path, const TensorFile& file) {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& [name, t] : file.tensors) {
    header[name] = {{"dtype", std::string(DTypeName(t.dtype))}, {"shape", t.shape},
                    {"data_offsets", {offset, offset + t.bytes}}};
    offset += t.bytes;
  }
  for (const auto& [name, v] : file.int32_tensors) {
    header[name] = {{"dtype", "I32"}, {"shape", {v.size()}}, {"data_offsets", {offset, offset + 4 * v.size()}}};
    offset += 4 * v.size();
  }
  if (!file.metadata.empty()) header["__metadata__"] = file.metadata;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // align the data section to 8 bytes
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot open for writing"));
  const uint64_t len = text.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, t] : file.tensors) out.write(reinterpret_cast<const char*>(t.data), static_cast<std::streamsize>(t.bytes));
  for (const auto& [name, v] : file.int32_tensors) out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(4 * v.size()));
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

}  // namespace kvcompact::client
