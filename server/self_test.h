// Self-test: compacts a generated problem with the backend and reports its figures. Used by the
// SelfTest RPC and as the warm-up that must pass before health turns SERVING.
#pragma once

#include "absl/status/statusor.h"
#include "core/layer.h"
#include "kvcompact/v1/kvcompact.pb.h"

namespace kvcompact::server {

// Fills defaults and checks bounds (the problem is generated in server memory).
absl::StatusOr<v1::SelfTestRequest> NormalizeSelfTest(const v1::SelfTestRequest& request);
absl::StatusOr<v1::SelfTestResponse> RunSelfTest(Backend& backend, const v1::SelfTestRequest& request);

}  // namespace kvcompact::server
