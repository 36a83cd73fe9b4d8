// A structure-aware libFuzzer mutator for request streams: it decodes the stream, picks one
// numeric field anywhere in one message (found by protobuf reflection, so new fields are covered
// without a list to keep), sets it to an edge value (0, 1, 2^31 - 1, 2^31, 2^32, 2^63, 2^64 - 1,
// negatives seen as unsigned, denormals, huge floats, NaN, Inf) and encodes the stream again.
// Byte-level mutation still runs half of the time, for what the structure cannot express.
// libprotobuf-mutator would do this generically; Debian 12 does not package it.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>

#include "tests/fuzz/stream_codec.h"

namespace kvcompact::fuzz {

inline constexpr uint64_t kEdgeIntegers[] = {
    0, 1, 2, 3, 7, 64, 255, 4096, (1ull << 20), (1ull << 31) - 1, 1ull << 31, (1ull << 32) - 1, 1ull << 32,
    (1ull << 62), (1ull << 63) - 1, 1ull << 63, ~0ull - (1ull << 62) + 1, ~0ull - 7, ~0ull - 1, ~0ull};
inline constexpr double kEdgeReals[] = {0.0, -0.0, 1e-300, 1e-45, 1e-38, 0.5, 1.0, 2.0, 1e9, 1e19, 1e30, 3.4e38,
                                        1e300, -1.0, -1e30};

struct NumericField {
  google::protobuf::Message* message;
  const google::protobuf::FieldDescriptor* field;
  int index;  // -1: singular
};

inline void CollectNumericFields(google::protobuf::Message* m, std::vector<NumericField>* out) {
  using FD = google::protobuf::FieldDescriptor;
  const google::protobuf::Reflection* r = m->GetReflection();
  std::vector<const FD*> fields;
  r->ListFields(*m, &fields);
  for (const FD* f : fields) {
    const int count = f->is_repeated() ? r->FieldSize(*m, f) : 1;
    for (int i = 0; i < count; ++i) {
      const int index = f->is_repeated() ? i : -1;
      if (f->cpp_type() == FD::CPPTYPE_MESSAGE) {
        CollectNumericFields(f->is_repeated() ? r->MutableRepeatedMessage(m, f, i) : r->MutableMessage(m, f), out);
      } else if (f->cpp_type() != FD::CPPTYPE_STRING && f->cpp_type() != FD::CPPTYPE_BOOL) {
        out->push_back({m, f, index});
      }
    }
  }
}

inline void SetEdgeValue(const NumericField& nf, std::mt19937_64& rng) {
  using FD = google::protobuf::FieldDescriptor;
  using R = google::protobuf::Reflection;
  const R* r = nf.message->GetReflection();
  const uint64_t u = kEdgeIntegers[rng() % std::size(kEdgeIntegers)];
  double real = kEdgeReals[rng() % std::size(kEdgeReals)];
  if (rng() % 8 == 0) real = (rng() % 2) ? std::numeric_limits<double>::infinity() : std::nan("");
  // One setter pair (singular, repeated) per field type.
  auto set = [&](auto single, auto repeated, auto value) {
    if (nf.index >= 0) {
      (r->*repeated)(nf.message, nf.field, nf.index, value);
    } else {
      (r->*single)(nf.message, nf.field, value);
    }
  };
  switch (nf.field->cpp_type()) {
    case FD::CPPTYPE_INT32: set(&R::SetInt32, &R::SetRepeatedInt32, static_cast<int32_t>(u)); break;
    case FD::CPPTYPE_ENUM: set(&R::SetEnumValue, &R::SetRepeatedEnumValue, static_cast<int>(u)); break;
    case FD::CPPTYPE_INT64: set(&R::SetInt64, &R::SetRepeatedInt64, static_cast<int64_t>(u)); break;
    case FD::CPPTYPE_UINT32: set(&R::SetUInt32, &R::SetRepeatedUInt32, static_cast<uint32_t>(u)); break;
    case FD::CPPTYPE_UINT64: set(&R::SetUInt64, &R::SetRepeatedUInt64, u); break;
    case FD::CPPTYPE_FLOAT: set(&R::SetFloat, &R::SetRepeatedFloat, static_cast<float>(real)); break;
    case FD::CPPTYPE_DOUBLE: set(&R::SetDouble, &R::SetRepeatedDouble, real); break;
    default: break;
  }
}

// Returns the new size, or 0 when the input does not decode (the caller mutates bytes then).
inline size_t MutateToEdgeValues(uint8_t* data, size_t size, size_t max_size, unsigned seed, size_t max_messages) {
  std::vector<v1::CompactRequest> requests = DecodeStream(data, size, max_messages);
  if (requests.empty()) return 0;
  std::mt19937_64 rng(seed);
  const int edits = 1 + static_cast<int>(rng() % 3);
  for (int e = 0; e < edits; ++e) {
    v1::CompactRequest& target = requests[rng() % requests.size()];
    std::vector<NumericField> fields;
    CollectNumericFields(&target, &fields);
    if (fields.empty()) continue;
    SetEdgeValue(fields[rng() % fields.size()], rng);
  }
  const std::string out = EncodeStream(requests);
  if (out.size() > max_size) return 0;
  std::copy(out.begin(), out.end(), data);
  return out.size();
}

}  // namespace kvcompact::fuzz
