// Self-test: compacts a generated problem with the backend and reports its figures. Used by the
// SelfTest RPC and as the warm-up that must pass before health turns SERVING.
#pragma once

#include <functional>

#include "absl/status/statusor.h"
#include "core/layer.h"
#include "kvcompact/v1/kvcompact.pb.h"

namespace kvcompact::server {

// Fills defaults and checks bounds: each dimension, at most one entry per method, and the whole
// work (heads x tokens x queries x methods <= kMaxSelfTestWork), since the problem is generated
// and compacted in server memory on the one worker.
inline constexpr uint64_t kMaxSelfTestWork = uint64_t{1} << 31;
absl::StatusOr<v1::SelfTestRequest> NormalizeSelfTest(const v1::SelfTestRequest& request);
// `cancelled` (optional) is checked before each method and head: CANCELLED once it is true.
absl::StatusOr<v1::SelfTestResponse> RunSelfTest(Backend& backend, const v1::SelfTestRequest& request,
                                                 std::function<bool()> cancelled = {});

}  // namespace kvcompact::server
