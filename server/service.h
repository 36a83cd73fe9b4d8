// The gRPC service: a thin layer that validates, hands layers to the worker and streams results.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "kvcompact/v1/kvcompact.grpc.pb.h"
#include "server/host_buffers.h"
#include "server/limits.h"
#include "server/log_limiter.h"
#include "server/memory_budget.h"
#include "server/metrics.h"
#include "server/profiles.h"
#include "server/security.h"
#include "server/stream_watchdog.h"
#include "server/worker.h"

namespace kvcompact::server {

struct ServiceContext {
  Worker* worker = nullptr;
  Metrics* metrics = nullptr;
  Limits limits;
  std::string version;
  std::vector<std::string> backends;  // built in
  int threads = 1;
  const ProfileRegistry* profiles = nullptr;  // budget profiles (Allocation.profile)
  const TokenAuthenticator* auth = nullptr;   // null or disabled: no token needed
  const ClientIdentityFilter* identities = nullptr;  // null or disabled: any client certificate
  MemoryBudget* memory = nullptr;             // null: no host-memory admission control
  HostBufferPool* buffers = nullptr;          // null: layer buffers are allocated afresh
  StreamWatchdog* watchdog = nullptr;         // null: no timeouts
  LogLimiter log_limiter;                     // lines that clients can cause
  std::atomic<int> open_streams{0};           // Compact and Sink streams (max_concurrent_streams)
  // Accepted Compact streams whose reactor still exists (finished ones until gRPC is done with
  // them): at most 2 x max_concurrent_streams, so that streams reset faster than gRPC completes
  // them cannot pile up reactors.
  std::atomic<int> live_streams{0};
  std::atomic<int> self_tests{0};             // SelfTest calls queued or running (at most one)
};

// Compact, GetServerInfo and SelfTest are registered raw (grpc::ByteBuffer): the service parses
// requests itself, so a message that is not the method's request type gets INVALID_ARGUMENT
// saying so (gRPC's typed callback handlers answer a parse failure as if the method were not
// there, or as a half-close), and Compact knows the exact bytes of its queued responses. Sink, the
// transport baseline, stays typed.
using ServiceBase = v1::KVCompact::WithRawCallbackMethod_Compact<v1::KVCompact::WithRawCallbackMethod_GetServerInfo<
    v1::KVCompact::WithRawCallbackMethod_SelfTest<v1::KVCompact::WithCallbackMethod_Sink<v1::KVCompact::Service>>>>;

class KVCompactService final : public ServiceBase {
 public:
  explicit KVCompactService(ServiceContext* context) : context_(context) {}

  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Compact(grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                          grpc::ByteBuffer* response) override;
  grpc::ServerReadReactor<v1::CompactRequest>* Sink(grpc::CallbackServerContext* context,
                                                    v1::SinkSummary* response) override;
  grpc::ServerUnaryReactor* SelfTest(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;

 private:
  // OK, or the status to finish with: PERMISSION_DENIED for a client certificate identity not
  // allowed, UNAUTHENTICATED for a missing or wrong token (logged with the peer, never the token;
  // the log lines are rate-limited).
  grpc::Status Authenticate(const grpc::CallbackServerContext& context) const;
  // A Compact or Sink stream slot: OK, or the status to refuse the stream with.
  absl::Status AdmitStream(const grpc::CallbackServerContext& context);

  ServiceContext* context_;
};

// absl::Status -> grpc::Status, keeping code and message.
grpc::Status ToGrpc(const absl::Status& status);

}  // namespace kvcompact::server
