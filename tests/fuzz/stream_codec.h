// The fuzzed request stream's byte format: CompactRequest messages, each preceded by its length
// as a protobuf varint. Seeds write it from real client chunks; the fuzzer reads it back.
#pragma once

#include <string>
#include <vector>

#include <google/protobuf/io/coded_stream.h>

#include "kvcompact/v1/kvcompact.pb.h"

namespace kvcompact::fuzz {

inline std::vector<v1::CompactRequest> DecodeStream(const uint8_t* data, size_t size, size_t max_messages) {
  std::vector<v1::CompactRequest> out;
  google::protobuf::io::CodedInputStream in(data, static_cast<int>(size));
  uint32_t length = 0;
  while (out.size() < max_messages && in.ReadVarint32(&length)) {
    std::string bytes;
    if (!in.ReadString(&bytes, static_cast<int>(length))) break;
    v1::CompactRequest request;
    if (!request.ParseFromString(bytes)) break;  // what gRPC would refuse before the reactor sees it
    out.push_back(std::move(request));
  }
  return out;
}

inline std::string EncodeStream(const std::vector<v1::CompactRequest>& requests) {
  std::string out;
  for (const v1::CompactRequest& r : requests) {
    const std::string bytes = r.SerializeAsString();
    uint32_t n = static_cast<uint32_t>(bytes.size());
    do {  // varint
      uint8_t b = n & 0x7f;
      n >>= 7;
      out.push_back(static_cast<char>(b | (n ? 0x80 : 0)));
    } while (n);
    out += bytes;
  }
  return out;
}

}  // namespace kvcompact::fuzz
