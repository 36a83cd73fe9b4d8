// The C++ client library an inference server links: streams a context's per-layer K/V and
// reference queries to kvcompact-server, chunked under the message limit, optionally over several
// parallel streams (one channel each), and collects the compacted blocks as layers complete.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "client/channel_security.h"
#include "client/host_tensor.h"
#include "core/layer.h"
#include "kvcompact/v1/kvcompact.grpc.pb.h"

namespace kvcompact::client {

struct LayerInput {
  uint32_t layer = 0;
  HostTensor keys;                 // [kv_heads, T, head_dim], post-RoPE
  HostTensor values;               // [kv_heads, T, value_dim]
  std::optional<HostTensor> queries;  // [kv_heads, n, head_dim], pooled over each GQA group
  std::optional<HostTensor> bias;  // [kv_heads, T]: beta of an earlier compaction
};

struct CompactedHead {
  uint64_t tokens = 0;             // t of this head
  DType dtype = DType::kFloat32;   // of keys and values
  std::string keys;                // [t, head_dim]
  std::vector<float> beta;         // [t]
  std::string values;              // [t, value_dim]
  std::vector<uint32_t> indices;   // kept positions, when requested
};

struct CompactedLayer {
  uint32_t layer = 0;
  std::vector<CompactedHead> heads;
  v1::LayerDone done;              // per-head figures and stage times
};

struct CompactOutcome {
  std::vector<CompactedLayer> layers;  // sorted by layer
  std::vector<v1::LayerError> errors;
  v1::StreamSummary summary;           // summed over streams
  double wall_seconds = 0;
};

struct ClientOptions {
  uint64_t max_message_bytes = 4u << 20;  // chunk size bound; keep <= the server's limit
  int streams = 1;                        // parallel streams, layers spread round-robin
  ChannelSecurity security;               // TLS, client certificate, bearer token
  double stream_timeout_seconds = 0;      // deadline of each Compact/Sink stream; 0: none
};

// Cancels the calls of a Compact in progress, from any thread.
class Canceller {
 public:
  void Cancel();
  void Register(grpc::ClientContext* context);
  void Unregister(grpc::ClientContext* context);

 private:
  std::mutex mu_;
  std::vector<grpc::ClientContext*> contexts_;
  std::atomic<bool> cancelled_{false};
};

class Client {
 public:
  Client(std::string target, ClientOptions options = {});

  absl::StatusOr<v1::ServerInfo> GetServerInfo(double timeout_seconds = 10);
  // grpc.health.v1 Check: true when SERVING. `service` "" is the whole server.
  absl::StatusOr<bool> IsServing(const std::string& service = "", double timeout_seconds = 5);
  absl::StatusOr<v1::SelfTestResponse> SelfTest(const v1::SelfTestRequest& request, double timeout_seconds = 120);

  // Sends the same messages as Compact to the Sink RPC, which only counts them (transport baseline).
  absl::StatusOr<v1::SinkSummary> Sink(const v1::StreamHeader& header, const std::vector<LayerInput>& layers);

  // Sends every layer, returns when all streams have finished. `on_layer` runs (serialised) as
  // each layer arrives. A stream-level failure (bad header, cancellation) is the returned status;
  // per-layer failures are in CompactOutcome::errors.
  absl::StatusOr<CompactOutcome> Compact(const v1::StreamHeader& header, const std::vector<LayerInput>& layers,
                                         const std::function<void(const CompactedLayer&)>& on_layer = {},
                                         Canceller* canceller = nullptr);

  // For raw calls (tools, tests): a channel with this client's security and limits (stream index
  // `index` gets its own connection), and a context with a deadline (0: none) and, over plaintext,
  // the token.
  std::shared_ptr<grpc::Channel> MakeChannel(int index) const;
  void Prepare(grpc::ClientContext* context, double timeout_seconds = 0) const;

 private:

  std::string target_;
  ClientOptions options_;
};

// A core LayerData (fp32) as client input in a wire dtype (generated data, tests, benchmarks).
LayerInput ToLayerInput(const LayerData& data, DType dtype = DType::kFloat32);

// Checks the shapes of one layer against each other (the server checks them against the header).
absl::Status ValidateLayerInput(const LayerInput& layer);

// Splits a layer into request messages no larger than about `max_message_bytes` each.
std::vector<v1::CompactRequest> ChunkLayer(const LayerInput& layer, uint64_t max_message_bytes);

}  // namespace kvcompact::client
