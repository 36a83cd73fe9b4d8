#include "server/self_test.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/budget.h"
#include "core/synthetic.h"

namespace kvcompact::server {

absl::StatusOr<v1::SelfTestRequest> NormalizeSelfTest(const v1::SelfTestRequest& in) {
  v1::SelfTestRequest r = in;
  if (!r.tokens()) r.set_tokens(1024);
  if (!r.queries()) r.set_queries(512);
  if (!r.head_dim()) r.set_head_dim(64);
  if (!r.heads()) r.set_heads(2);
  if (!(r.ratio() > 0)) r.set_ratio(20);
  if (!std::isfinite(r.ratio())) return absl::InvalidArgumentError("self-test ratio must be finite");
  if (r.methods().empty()) {
    r.add_methods(v1::METHOD_AM_HIGHEST_ATTENTION);
    r.add_methods(v1::METHOD_H2O);
    r.add_methods(v1::METHOD_SNAPKV);
  }
  if (r.tokens() > 16384 || r.queries() > 8192 || r.head_dim() > 256 || r.heads() > 8) {
    return absl::InvalidArgumentError("self-test limits: tokens <= 16384, queries <= 8192, head_dim <= 256, heads <= 8");
  }
  if (r.tokens() < 2 || r.queries() < 2) return absl::InvalidArgumentError("self-test needs tokens >= 2 and queries >= 2");
  std::set<int> seen;
  for (int m : r.methods()) {
    if (!v1::Method_IsValid(m) || m == v1::METHOD_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat("unknown method ", m));
    }
    if (!seen.insert(m).second) return absl::InvalidArgumentError(absl::StrCat("method ", m, " is listed twice"));
  }
  const uint64_t work = uint64_t{r.heads()} * r.tokens() * r.queries() * static_cast<uint64_t>(r.methods_size());
  if (work > kMaxSelfTestWork) {
    return absl::InvalidArgumentError(absl::StrCat("self-test too large: heads x tokens x queries x methods = ", work,
                                                   " > ", kMaxSelfTestWork));
  }
  return r;
}

absl::StatusOr<v1::SelfTestResponse> RunSelfTest(Backend& backend, const v1::SelfTestRequest& request,
                                                 std::function<bool()> cancelled) {
  SyntheticShape shape;
  shape.heads = request.heads();
  shape.tokens = request.tokens();
  shape.queries = request.queries();
  shape.head_dim = shape.value_dim = request.head_dim();
  v1::SelfTestResponse response;
  response.set_backend(std::string(backend.name()));
  for (int m : request.methods()) {
    if (cancelled && cancelled()) return absl::CancelledError("self-test cancelled");
    LayerJob job;
    job.cancelled = cancelled;
    job.data = MakeSyntheticLayer(shape, request.seed());
    job.options.method = static_cast<Method>(m);
    job.options.seed = request.seed();
    job.budgets.assign(shape.heads, RatioBudget(shape.tokens, request.ratio()));
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<LayerResult> result = backend.CompactLayer(job);
    if (!result.ok()) return result.status();
    v1::SelfTestResult* out = response.add_results();
    out->set_method(static_cast<v1::Method>(m));
    out->set_method_name(std::string(GetMethodSpec(static_cast<Method>(m)).name));
    out->set_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    double out_err = 0, mass_err = 0;
    for (const CompactedHead& h : result->heads) {
      out_err += h.quality.output_rel_error;
      mass_err += h.quality.mass_rel_error;
    }
    out->set_output_rel_error(static_cast<float>(out_err / shape.heads));
    out->set_mass_rel_error(static_cast<float>(mass_err / shape.heads));
  }
  return response;
}

}  // namespace kvcompact::server
