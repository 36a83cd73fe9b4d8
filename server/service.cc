#include "server/service.h"

#include <grpcpp/impl/codegen/proto_utils.h>
#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "core/method.h"
#include "server/compact_reactor.h"
#include "server/self_test.h"

namespace kvcompact::server {

grpc::Status ToGrpc(const absl::Status& status) {
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::Status KVCompactService::Authenticate(const grpc::CallbackServerContext& context) const {
  grpc::Status status = context_->identities != nullptr ? context_->identities->Check(context) : grpc::Status::OK;
  if (status.ok() && context_->auth != nullptr) status = context_->auth->Check(context);
  uint64_t suppressed = 0;
  if (!status.ok() && context_->log_limiter.Allow(&suppressed)) {
    spdlog::warn("{} call from {}: {}{}", status.error_code() == grpc::StatusCode::PERMISSION_DENIED ? "refused" : "unauthenticated",
                 context.peer(), status.error_message(),
                 suppressed ? absl::StrCat(" [", suppressed, " similar lines suppressed]") : "");
  }
  return status;
}

absl::Status KVCompactService::AdmitStream(const grpc::CallbackServerContext& context) {
  const int open = ++context_->open_streams;  // given back by the stream when it finishes
  if (grpc::Status auth = Authenticate(context); !auth.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(auth.error_code()), auth.error_message());
  }
  if (open > static_cast<int>(context_->limits.max_concurrent_streams) ||
      context_->live_streams.load() >= 2 * static_cast<int>(context_->limits.max_concurrent_streams)) {
    return absl::ResourceExhaustedError(absl::StrCat("too many concurrent streams (max_concurrent_streams = ",
                                                     context_->limits.max_concurrent_streams, "); retry later"));
  }
  return absl::OkStatus();
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* KVCompactService::Compact(grpc::CallbackServerContext* context) {
  return new CompactReactor(context_, context, AdmitStream(*context));
}

namespace {

// The request of a raw unary call, or the INVALID_ARGUMENT status that says it is not one.
template <typename Request>
grpc::Status ParseRequest(const grpc::ByteBuffer* raw, const char* type, Request* out) {
  grpc::ByteBuffer copy(*raw);  // Deserialize consumes its buffer; the copy shares the slices
  if (grpc::SerializationTraits<Request>::Deserialize(&copy, out).ok()) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                      absl::StrCat("the request (", raw->Length(), " bytes) is not a valid ", type));
}

template <typename Response>
void SetResponse(const Response& message, grpc::ByteBuffer* out) {
  bool own_buffer = false;
  grpc::SerializationTraits<Response>::Serialize(message, out, &own_buffer);
}

}  // namespace

grpc::ServerUnaryReactor* KVCompactService::GetServerInfo(grpc::CallbackServerContext* context,
                                                          const grpc::ByteBuffer* request, grpc::ByteBuffer* raw_response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status auth = Authenticate(*context); !auth.ok()) {
    context_->metrics->CountError(absl::StatusCodeToString(static_cast<absl::StatusCode>(auth.error_code())));
    reactor->Finish(auth);
    return reactor;
  }
  v1::ServerInfoRequest parsed;
  if (grpc::Status s = ParseRequest(request, "kvcompact.v1.ServerInfoRequest", &parsed); !s.ok()) {
    context_->metrics->CountError("INVALID_ARGUMENT");
    reactor->Finish(s);
    return reactor;
  }
  v1::ServerInfo info;
  v1::ServerInfo* response = &info;
  response->set_version(context_->version);
  response->set_backend(std::string(context_->worker->backend_name()));
  for (const std::string& b : context_->backends) response->add_backends(b);
  for (const MethodSpec& m : AllMethods()) response->add_methods(std::string(m.name));
  if (context_->profiles) {
    for (const std::string& name : context_->profiles->names()) response->add_profiles(name);
  }
  v1::Limits* limits = response->mutable_limits();
  limits->set_max_message_bytes(context_->limits.max_message_bytes);
  limits->set_max_tokens_per_block(context_->limits.max_tokens_per_block);
  limits->set_max_queries_per_layer(context_->limits.max_queries_per_layer);
  limits->set_max_concurrent_streams(context_->limits.max_concurrent_streams);
  limits->set_worker_queue_depth(context_->limits.worker_queue_depth);
  limits->set_max_host_memory_bytes(context_->limits.max_host_memory_bytes);
  limits->set_max_open_layers_per_stream(context_->limits.max_open_layers_per_stream);
  limits->set_layers_in_flight(static_cast<uint32_t>(context_->worker->lanes()));
  response->set_threads(context_->threads);
  response->set_device_bytes_reserved(context_->worker->backend().device_bytes_reserved());
  response->set_device_bytes_peak(context_->worker->backend().device_bytes_peak());
  SetResponse(info, raw_response);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

namespace {

// Counts and drops every message of a Sink stream; holds a stream slot like Compact.
class SinkReactor final : public grpc::ServerReadReactor<v1::CompactRequest> {
 public:
  SinkReactor(ServiceContext* context, v1::SinkSummary* summary, const absl::Status& admitted)
      : context_(context), summary_(summary) {
    if (!admitted.ok()) {
      context_->metrics->CountError(absl::StatusCodeToString(admitted.code()));
      Done(ToGrpc(admitted));
      return;
    }
    StartRead(&request_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      Done(grpc::Status::OK);
      return;
    }
    summary_->set_messages(summary_->messages() + 1);
    summary_->set_bytes(summary_->bytes() + request_.ByteSizeLong());
    StartRead(&request_);
  }
  void OnDone() override { delete this; }

 private:
  void Done(const grpc::Status& status) {
    context_->open_streams.fetch_sub(1);
    Finish(status);
  }
  ServiceContext* context_;
  v1::SinkSummary* summary_;
  v1::CompactRequest request_;
};

}  // namespace

grpc::ServerReadReactor<v1::CompactRequest>* KVCompactService::Sink(grpc::CallbackServerContext* context,
                                                                    v1::SinkSummary* response) {
  return new SinkReactor(context_, response, AdmitStream(*context));
}

grpc::ServerUnaryReactor* KVCompactService::SelfTest(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* raw_request, grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status auth = Authenticate(*context); !auth.ok()) {
    context_->metrics->CountError(absl::StatusCodeToString(static_cast<absl::StatusCode>(auth.error_code())));
    reactor->Finish(auth);
    return reactor;
  }
  v1::SelfTestRequest request;
  if (grpc::Status s = ParseRequest(raw_request, "kvcompact.v1.SelfTestRequest", &request); !s.ok()) {
    context_->metrics->CountError("INVALID_ARGUMENT");
    reactor->Finish(s);
    return reactor;
  }
  absl::StatusOr<v1::SelfTestRequest> normalized = NormalizeSelfTest(request);
  if (!normalized.ok()) {
    reactor->Finish(ToGrpc(normalized.status()));
    return reactor;
  }
  // One at a time: a self-test takes the worker from every stream while it runs.
  if (context_->self_tests.fetch_add(1) > 0) {
    context_->self_tests.fetch_sub(1);
    reactor->Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "a self-test is already running; retry later"));
    return reactor;
  }
  WorkItem item;
  ServiceContext* service = context_;
  item.cancelled = [context] { return context->IsCancelled(); };
  item.run = [reactor, response, service, context, req = *normalized](Backend* backend, double) {
    absl::StatusOr<v1::SelfTestResponse> result = absl::CancelledError("self-test dropped: cancelled or server shutting down");
    if (backend) result = RunSelfTest(*backend, req, [context] { return context->IsCancelled(); });
    if (result.ok()) SetResponse(*result, response);
    service->self_tests.fetch_sub(1);
    reactor->Finish(ToGrpc(result.status()));
  };
  if (!context_->worker->SubmitOrWait(item, [] {})) {
    context_->self_tests.fetch_sub(1);
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "worker queue full; retry later"));
  }
  return reactor;
}

}  // namespace kvcompact::server
