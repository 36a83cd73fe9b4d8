#include "client/client.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "proto/wire.h"

namespace kvcompact::client {
namespace {

constexpr uint64_t kMessageOverhead = 16 << 10;  // field tags, shapes, framing

// Copies heads [h0, h1) x rows [r0, r0 + rows) of a [H, R, C] tensor into `out`.
void Slice(const HostTensor& t, int64_t h0, int64_t h1, int64_t r0, int64_t rows, v1::Tensor* out) {
  const int64_t R = t.shape[1], C = t.shape.size() > 2 ? t.shape[2] : 1;
  const size_t es = DTypeSize(t.dtype);
  out->set_dtype(DTypeToProto(t.dtype));
  out->add_shape(h1 - h0);
  out->add_shape(rows);
  if (t.shape.size() > 2) out->add_shape(C);
  std::string* data = out->mutable_data();
  data->resize(static_cast<size_t>((h1 - h0) * rows * C) * es);
  for (int64_t h = h0; h < h1; ++h) {
    std::memcpy(data->data() + (h - h0) * rows * C * es, t.data + (h * R + r0) * C * es, rows * C * es);
  }
}

// Rows per message and heads per message for a [H, R, ...] group whose row costs `row_bytes` per head.
void Plan(int64_t heads, int64_t rows_total, uint64_t row_bytes, uint64_t max_bytes, int64_t* heads_per, int64_t* rows_per) {
  const uint64_t budget = max_bytes > 2 * kMessageOverhead ? max_bytes - kMessageOverhead : max_bytes / 2;
  *heads_per = heads;
  if (row_bytes * heads > budget) *heads_per = 1;
  *rows_per = std::clamp<int64_t>(static_cast<int64_t>(budget / (row_bytes * *heads_per)), 1, rows_total);
}

// Header, then the layers s, s + streams, ... of `layers`, chunked; then half-close.
template <typename Writer>
void WriteStream(Writer* stream, const v1::StreamHeader& header, const std::vector<LayerInput>& layers, int s,
                 int streams, uint64_t max_message_bytes) {
  v1::CompactRequest first;
  *first.mutable_header() = header;
  if (streams > 1) first.mutable_header()->set_request_id(absl::StrCat(header.request_id(), "/", s));
  bool ok = stream->Write(first);
  for (size_t i = s; ok && i < layers.size(); i += streams) {
    for (v1::CompactRequest& req : ChunkLayer(layers[i], max_message_bytes)) {
      if (!(ok = stream->Write(req))) break;
    }
  }
  stream->WritesDone();
}

}  // namespace

void Canceller::Cancel() {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_ = true;
  for (grpc::ClientContext* c : contexts_) c->TryCancel();
}

void Canceller::Register(grpc::ClientContext* context) {
  std::lock_guard<std::mutex> lock(mu_);
  contexts_.push_back(context);
  if (cancelled_) context->TryCancel();
}

void Canceller::Unregister(grpc::ClientContext* context) {
  std::lock_guard<std::mutex> lock(mu_);
  contexts_.erase(std::remove(contexts_.begin(), contexts_.end(), context), contexts_.end());
}

LayerInput ToLayerInput(const LayerData& d, DType dtype) {
  auto encode = [dtype](const std::vector<float>& v, std::vector<int64_t> dims) {
    std::string bytes(v.size() * DTypeSize(dtype), '\0');
    EncodeFromFloat(v.data(), v.size(), dtype, bytes.data());
    return HostTensor::FromBytes(std::move(bytes), dtype, std::move(dims));
  };
  LayerInput in;
  in.layer = static_cast<uint32_t>(d.layer);
  in.keys = encode(d.keys, {d.heads, d.tokens, d.head_dim});
  in.values = encode(d.values, {d.heads, d.tokens, d.value_dim});
  if (d.queries > 0) in.queries = encode(d.query_data, {d.heads, d.queries, d.head_dim});
  if (!d.bias.empty()) in.bias = HostTensor::FromFloats(d.bias, {d.heads, d.tokens});
  return in;
}

absl::Status ValidateLayerInput(const LayerInput& l) {
  const std::string where = absl::StrCat("layer ", l.layer, ": ");
  if (l.keys.shape.size() != 3) return absl::InvalidArgumentError(where + "keys must be [kv_heads, T, head_dim], got " + l.keys.ShapeString());
  if (l.values.shape.size() != 3 || l.values.shape[0] != l.keys.shape[0] || l.values.shape[1] != l.keys.shape[1]) {
    return absl::InvalidArgumentError(where + "values must be [kv_heads, T, value_dim] matching keys " +
                                      l.keys.ShapeString() + ", got " + l.values.ShapeString());
  }
  for (const HostTensor* t : {&l.keys, &l.values}) {
    for (int64_t dim : t->shape) {
      if (dim <= 0) return absl::InvalidArgumentError(where + "keys and values need positive dimensions, got " + t->ShapeString());
    }
  }
  if (l.queries && (l.queries->shape.size() != 3 || l.queries->shape[0] != l.keys.shape[0] ||
                    l.queries->shape[2] != l.keys.shape[2])) {
    return absl::InvalidArgumentError(where + "queries must be [kv_heads, n, head_dim] matching keys " +
                                      l.keys.ShapeString() + ", got " + l.queries->ShapeString());
  }
  if (l.bias && (l.bias->shape.size() != 2 || l.bias->shape[0] != l.keys.shape[0] || l.bias->shape[1] != l.keys.shape[1])) {
    return absl::InvalidArgumentError(where + "bias must be [kv_heads, T], got " + l.bias->ShapeString());
  }
  return absl::OkStatus();
}

std::vector<v1::CompactRequest> ChunkLayer(const LayerInput& in, uint64_t max_bytes) {
  std::vector<v1::CompactRequest> out;
  const int64_t H = in.keys.shape[0], T = in.keys.shape[1], d = in.keys.shape[2], dv = in.values.shape[2];
  // Calls emit(h0, h1, r0, rows) for blocks of a [H, R, ...] group that fit the message limit.
  auto for_each_block = [&](int64_t R, uint64_t row_bytes, const auto& emit) {
    int64_t heads_per = 0, rows_per = 0;
    Plan(H, R, row_bytes, max_bytes, &heads_per, &rows_per);
    for (int64_t h0 = 0; h0 < H; h0 += heads_per) {
      for (int64_t r0 = 0; r0 < R; r0 += rows_per) emit(h0, std::min(H, h0 + heads_per), r0, std::min(rows_per, R - r0));
    }
  };
  const uint64_t kv_row = d * DTypeSize(in.keys.dtype) + dv * DTypeSize(in.values.dtype) +
                          (in.bias ? DTypeSize(in.bias->dtype) : 0);
  for_each_block(T, kv_row, [&](int64_t h0, int64_t h1, int64_t r0, int64_t rows) {
    v1::CompactRequest req;
    v1::KVChunk* c = req.mutable_kv();
    c->set_layer(in.layer);
    c->set_head_begin(h0);
    c->set_head_end(h1);
    c->set_token_begin(r0);
    c->set_layer_tokens(T);
    Slice(in.keys, h0, h1, r0, rows, c->mutable_keys());
    Slice(in.values, h0, h1, r0, rows, c->mutable_values());
    if (in.bias) Slice(*in.bias, h0, h1, r0, rows, c->mutable_bias());
    out.push_back(std::move(req));
  });
  if (in.queries) {
    const int64_t n = in.queries->shape[1];
    for_each_block(n, d * DTypeSize(in.queries->dtype), [&](int64_t h0, int64_t h1, int64_t r0, int64_t rows) {
      v1::CompactRequest req;
      v1::QueryChunk* c = req.mutable_queries();
      c->set_layer(in.layer);
      c->set_head_begin(h0);
      c->set_head_end(h1);
      c->set_query_begin(r0);
      c->set_layer_queries(n);
      Slice(*in.queries, h0, h1, r0, rows, c->mutable_queries());
      out.push_back(std::move(req));
    });
  }
  v1::CompactRequest end;
  end.mutable_layer_end()->set_layer(in.layer);
  out.push_back(std::move(end));
  return out;
}

Client::Client(std::string target, ClientOptions options) : target_(std::move(target)), options_(options) {}

std::shared_ptr<grpc::Channel> Client::MakeChannel(int index) const {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // Distinct arguments give each stream its own TCP connection (and HTTP/2 flow-control window).
  args.SetInt("kvcompact.channel_index", index);
  // A target that resolves to several servers (a headless Service: dns:///kvcompact.NS.svc:50051)
  // spreads calls over all of them instead of pinning the first address.
  args.SetLoadBalancingPolicyName("round_robin");
  if (!options_.security.server_name.empty()) {
    args.SetSslTargetNameOverride(options_.security.server_name);
  }
  return grpc::CreateCustomChannel(target_, MakeChannelCredentials(options_.security), args);
}

void Client::Prepare(grpc::ClientContext* context, double timeout_seconds) const {
  if (timeout_seconds > 0) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
  }
  AddPlaintextToken(options_.security, context);
}

absl::StatusOr<v1::ServerInfo> Client::GetServerInfo(double timeout_seconds) {
  auto stub = v1::KVCompact::NewStub(MakeChannel(0));
  grpc::ClientContext ctx;
  Prepare(&ctx, timeout_seconds);
  v1::ServerInfo info;
  grpc::Status s = stub->GetServerInfo(&ctx, v1::ServerInfoRequest(), &info);
  if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  return info;
}

absl::StatusOr<bool> Client::IsServing(const std::string& service, double timeout_seconds) {
  auto stub = grpc::health::v1::Health::NewStub(MakeChannel(0));
  grpc::ClientContext ctx;
  Prepare(&ctx, timeout_seconds);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status s = stub->Check(&ctx, request, &response);
  if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

absl::StatusOr<v1::SelfTestResponse> Client::SelfTest(const v1::SelfTestRequest& request, double timeout_seconds) {
  auto stub = v1::KVCompact::NewStub(MakeChannel(0));
  grpc::ClientContext ctx;
  Prepare(&ctx, timeout_seconds);
  v1::SelfTestResponse response;
  grpc::Status s = stub->SelfTest(&ctx, request, &response);
  if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  return response;
}

absl::StatusOr<v1::SinkSummary> Client::Sink(const v1::StreamHeader& header, const std::vector<LayerInput>& layers) {
  const int streams = std::max(1, std::min<int>(options_.streams, std::max<size_t>(layers.size(), 1)));
  std::vector<v1::SinkSummary> summaries(streams);
  std::vector<grpc::Status> statuses(streams);
  auto run_stream = [&](int s) {
    auto stub = v1::KVCompact::NewStub(MakeChannel(s));
    grpc::ClientContext ctx;
    Prepare(&ctx, options_.stream_timeout_seconds);
    auto stream = stub->Sink(&ctx, &summaries[s]);
    WriteStream(stream.get(), header, layers, s, streams, options_.max_message_bytes);
    statuses[s] = stream->Finish();
  };
  std::vector<std::thread> threads;
  for (int s = 1; s < streams; ++s) threads.emplace_back(run_stream, s);
  run_stream(0);
  for (std::thread& t : threads) t.join();
  v1::SinkSummary total;
  for (int s = 0; s < streams; ++s) {
    if (!statuses[s].ok()) return absl::Status(static_cast<absl::StatusCode>(statuses[s].error_code()), statuses[s].error_message());
    total.set_messages(total.messages() + summaries[s].messages());
    total.set_bytes(total.bytes() + summaries[s].bytes());
  }
  return total;
}

absl::StatusOr<CompactOutcome> Client::Compact(const v1::StreamHeader& header, const std::vector<LayerInput>& layers,
                                               const std::function<void(const CompactedLayer&)>& on_layer,
                                               Canceller* canceller) {
  for (const LayerInput& layer : layers) {
    if (absl::Status s = ValidateLayerInput(layer); !s.ok()) return s;
  }
  const auto start = std::chrono::steady_clock::now();
  const int streams = std::max(1, std::min<int>(options_.streams, std::max<size_t>(layers.size(), 1)));
  std::mutex mu;  // guards outcome and serialises on_layer
  CompactOutcome outcome;
  std::vector<grpc::Status> statuses(streams);

  auto run_stream = [&](int s) {
    auto stub = v1::KVCompact::NewStub(MakeChannel(s));
    grpc::ClientContext ctx;
    Prepare(&ctx, options_.stream_timeout_seconds);
    if (canceller) canceller->Register(&ctx);
    auto stream = stub->Compact(&ctx);
    std::thread writer([&] { WriteStream(stream.get(), header, layers, s, streams, options_.max_message_bytes); });
    std::map<uint32_t, CompactedLayer> partial;
    v1::CompactResponse resp;
    while (stream->Read(&resp)) {
      if (resp.has_head()) {
        const v1::HeadResult& h = resp.head();
        CompactedLayer& layer = partial[h.layer()];
        layer.layer = h.layer();
        if (layer.heads.size() <= h.head()) layer.heads.resize(h.head() + 1);
        CompactedHead& head = layer.heads[h.head()];
        head.tokens = h.head_tokens();
        head.dtype = DTypeFromProto(h.keys().dtype()).value_or(DType::kFloat32);
        head.keys += h.keys().data();
        head.values += h.values().data();
        const size_t nb = h.beta().data().size() / 4;
        const size_t old = head.beta.size();
        head.beta.resize(old + nb);
        std::memcpy(head.beta.data() + old, h.beta().data().data(), nb * 4);
        head.indices.insert(head.indices.end(), h.indices().begin(), h.indices().end());
      } else if (resp.has_layer_done()) {
        CompactedLayer layer = std::move(partial[resp.layer_done().layer()]);
        partial.erase(resp.layer_done().layer());
        layer.layer = resp.layer_done().layer();
        layer.done = resp.layer_done();
        std::lock_guard<std::mutex> lock(mu);
        if (on_layer) on_layer(layer);
        outcome.layers.push_back(std::move(layer));
      } else if (resp.has_layer_error()) {
        partial.erase(resp.layer_error().layer());
        std::lock_guard<std::mutex> lock(mu);
        outcome.errors.push_back(resp.layer_error());
      } else if (resp.has_summary()) {
        const v1::StreamSummary& in = resp.summary();
        std::lock_guard<std::mutex> lock(mu);
        v1::StreamSummary& out = outcome.summary;
        out.set_request_id(header.request_id());
        out.set_backend(in.backend());
        out.set_layers_done(out.layers_done() + in.layers_done());
        out.set_layers_failed(out.layers_failed() + in.layers_failed());
        out.set_tokens_in(out.tokens_in() + in.tokens_in());
        out.set_tokens_out(out.tokens_out() + in.tokens_out());
        out.set_bytes_in(out.bytes_in() + in.bytes_in());
        out.set_bytes_out(out.bytes_out() + in.bytes_out());
        out.set_wall_seconds(std::max(out.wall_seconds(), in.wall_seconds()));
        AddStageTimes(in.times(), out.mutable_times());
      }
    }
    writer.join();
    statuses[s] = stream->Finish();
    if (canceller) canceller->Unregister(&ctx);
  };

  std::vector<std::thread> threads;
  for (int s = 1; s < streams; ++s) threads.emplace_back(run_stream, s);
  run_stream(0);
  for (std::thread& t : threads) t.join();
  for (const grpc::Status& s : statuses) {
    if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  }
  std::sort(outcome.layers.begin(), outcome.layers.end(),
            [](const CompactedLayer& a, const CompactedLayer& b) { return a.layer < b.layer; });
  outcome.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return outcome;
}

}  // namespace kvcompact::client
