#include "proto/wire.h"

#include "absl/strings/str_cat.h"

namespace kvcompact {

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FP32: return DType::kFloat32;
    case v1::DTYPE_FP16: return DType::kFloat16;
    case v1::DTYPE_BF16: return DType::kBFloat16;
    default: return absl::InvalidArgumentError(absl::StrCat("unsupported dtype ", static_cast<int>(dtype)));
  }
}

v1::DType DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return v1::DTYPE_FP32;
    case DType::kFloat16: return v1::DTYPE_FP16;
    case DType::kBFloat16: return v1::DTYPE_BF16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

void AddStageTimes(const v1::StageTimes& from, v1::StageTimes* into) {
  into->set_decode_seconds(into->decode_seconds() + from.decode_seconds());
  into->set_score_seconds(into->score_seconds() + from.score_seconds());
  into->set_mass_fit_seconds(into->mass_fit_seconds() + from.mass_fit_seconds());
  into->set_value_fit_seconds(into->value_fit_seconds() + from.value_fit_seconds());
  into->set_evaluate_seconds(into->evaluate_seconds() + from.evaluate_seconds());
  into->set_queue_seconds(into->queue_seconds() + from.queue_seconds());
  into->set_total_seconds(into->total_seconds() + from.total_seconds());
}

}  // namespace kvcompact
