// Conversions between the v1 contract's messages and core types, shared by server and client.
#pragma once

#include "absl/status/statusor.h"
#include "core/dtype.h"
#include "kvcompact/v1/kvcompact.pb.h"

namespace kvcompact {

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype);
v1::DType DTypeToProto(DType dtype);
// into += from, field by field.
void AddStageTimes(const v1::StageTimes& from, v1::StageTimes* into);

}  // namespace kvcompact
