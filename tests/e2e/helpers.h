// Shared helpers of the end-to-end tests: generated layers as client inputs, headers, raw streams.
#pragma once

#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "client/client.h"
#include "core/synthetic.h"

namespace kvcompact::testing {

inline client::LayerInput ToInput(const LayerData& d) { return client::ToLayerInput(d); }

inline std::vector<LayerData> MakeLayers(int layers, int heads, int tokens, int queries, uint64_t seed = 3) {
  SyntheticShape shape;
  shape.heads = heads;
  shape.tokens = tokens;
  shape.queries = queries;
  std::vector<LayerData> out;
  for (int l = 0; l < layers; ++l) out.push_back(MakeSyntheticLayer(shape, seed, l));
  return out;
}

inline std::vector<client::LayerInput> ToInputs(const std::vector<LayerData>& layers) {
  std::vector<client::LayerInput> out;
  for (const LayerData& d : layers) out.push_back(ToInput(d));
  return out;
}

inline v1::StreamHeader Header(int layers, int heads, int head_dim, v1::Method method, double ratio) {
  v1::StreamHeader h;
  h.set_request_id("test");
  h.mutable_geometry()->set_num_layers(layers);
  h.mutable_geometry()->set_num_kv_heads(heads);
  h.mutable_geometry()->set_head_dim(head_dim);
  h.mutable_options()->set_method(method);
  h.mutable_options()->mutable_budget()->set_ratio(ratio);
  h.mutable_options()->set_holdout_fraction(0.2f);
  h.mutable_options()->set_return_indices(true);
  return h;
}

struct RawResult {
  std::vector<v1::CompactResponse> responses;
  grpc::Status status;
  std::vector<v1::LayerError> errors() const {
    std::vector<v1::LayerError> out;
    for (const auto& r : responses) if (r.has_layer_error()) out.push_back(r.layer_error());
    return out;
  }
  int layers_done() const {
    int n = 0;
    for (const auto& r : responses) n += r.has_layer_done();
    return n;
  }
};

// Sends exactly `requests` on one stream (no client-side checks), half-closes, reads everything.
inline RawResult RawCompact(const std::string& address, const std::vector<v1::CompactRequest>& requests) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(-1);
  args.SetMaxReceiveMessageSize(-1);
  auto stub = v1::KVCompact::NewStub(grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = stub->Compact(&ctx);
  for (const auto& r : requests) {
    if (!stream->Write(r)) break;
  }
  stream->WritesDone();
  RawResult result;
  v1::CompactResponse resp;
  while (stream->Read(&resp)) result.responses.push_back(resp);
  result.status = stream->Finish();
  return result;
}

inline v1::CompactRequest HeaderRequest(const v1::StreamHeader& h) {
  v1::CompactRequest r;
  *r.mutable_header() = h;
  return r;
}

}  // namespace kvcompact::testing
