// The gRPC service: a thin layer that validates, hands layers to the worker and streams results.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "kvcompact/v1/kvcompact.grpc.pb.h"
#include "server/limits.h"
#include "server/memory_budget.h"
#include "server/metrics.h"
#include "server/profiles.h"
#include "server/security.h"
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
  MemoryBudget* memory = nullptr;             // null: no host-memory admission control
  std::atomic<int> open_streams{0};
};

class KVCompactService final : public v1::KVCompact::CallbackService {
 public:
  explicit KVCompactService(ServiceContext* context) : context_(context) {}

  grpc::ServerBidiReactor<v1::CompactRequest, v1::CompactResponse>* Compact(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::ServerInfoRequest* request,
                                          v1::ServerInfo* response) override;
  grpc::ServerReadReactor<v1::CompactRequest>* Sink(grpc::CallbackServerContext* context,
                                                    v1::SinkSummary* response) override;
  grpc::ServerUnaryReactor* SelfTest(grpc::CallbackServerContext* context,
                                     const v1::SelfTestRequest* request,
                                     v1::SelfTestResponse* response) override;

 private:
  // OK, or the UNAUTHENTICATED status to finish with (logged with the peer, never the token).
  grpc::Status Authenticate(const grpc::CallbackServerContext& context) const;

  ServiceContext* context_;
};

// absl::Status -> grpc::Status, keeping code and message.
grpc::Status ToGrpc(const absl::Status& status);

}  // namespace kvcompact::server
