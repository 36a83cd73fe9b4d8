#include "server/compact_reactor.h"

#include <new>

#include <grpcpp/impl/codegen/proto_utils.h>
#include <spdlog/spdlog.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "proto/wire.h"

namespace kvcompact::server {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

std::string CodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

// fp32 bytes the tensors of a chunk decode to (the decode buffers, beside the message itself).
uint64_t DecodedBytes(const v1::CompactRequest& r) {
  uint64_t bytes = 0;
  auto add = [&](const v1::Tensor& t) {
    auto dtype = DTypeFromProto(t.dtype());
    if (dtype.ok()) bytes += t.data().size() / DTypeSize(*dtype) * 4;
  };
  if (r.has_kv()) {
    add(r.kv().keys());
    add(r.kv().values());
    add(r.kv().bias());
  } else if (r.has_queries()) {
    add(r.queries().queries());
  }
  return bytes;
}

}  // namespace

CompactReactor::CompactReactor(ServiceContext* context, grpc::CallbackServerContext* call, const absl::Status& reject)
    : context_(context), call_(call), shared_(std::make_shared<Shared>()), started_(Clock::now()),
      last_read_(started_) {
  shared_->self = this;
  std::lock_guard<std::mutex> lock(shared_->mu);
  if (!reject.ok()) {
    context_->metrics->CountError(CodeName(reject.code()));
    FinishLocked(ToGrpc(reject));
    return;
  }
  accepted_ = true;
  context_->live_streams.fetch_add(1);
  context_->metrics->streams_started.Increment();
  context_->metrics->streams_in_flight.Increment();
  if (context_->watchdog != nullptr) {
    std::weak_ptr<Shared> weak = shared_;
    context_->watchdog->Add([weak](Clock::time_point now) {
      std::shared_ptr<Shared> shared = weak.lock();
      if (!shared) return false;
      std::lock_guard<std::mutex> lock(shared->mu);
      if (shared->self == nullptr) return false;
      shared->self->OnTickLocked(now);
      return true;
    });
  }
  MaybeReadLocked();
}

void CompactReactor::OnReadDone(bool ok) {
  std::lock_guard<std::mutex> lock(shared_->mu);
  reading_ = false;
  if (finished_) return;
  if (!ok) {  // half-close by the client, or the stream broke (OnCancel tells which)
    reads_done_ = true;
    if (!plan_ && !shared_->cancelled) {
      StreamErrorLocked(grpc::StatusCode::INVALID_ARGUMENT, "stream closed before a StreamHeader was sent");
      return;
    }
    if (assembler_ && !shared_->cancelled) {
      for (uint32_t layer : assembler_->OpenLayers()) {
        ReportLayerErrorLocked(layer, absl::InvalidArgumentError("the stream was half-closed before this layer's LayerEnd"));
      }
    }
    MaybeFinishLocked();
    return;
  }
  last_read_ = Clock::now();
  ++messages_read_;
  const uint64_t message_bytes = read_buffer_.Length();
  grpc::Status parsed = grpc::SerializationTraits<v1::CompactRequest>::Deserialize(&read_buffer_, &request_);
  if (!parsed.ok()) {
    StreamErrorLocked(grpc::StatusCode::INVALID_ARGUMENT,
                      absl::StrCat("message ", messages_read_, " of the stream (", message_bytes,
                                   " bytes) is not a valid kvcompact.v1.CompactRequest"));
    return;
  }
  // A chunk's message and decode buffers are held while it is decoded: inside admission.
  MemoryReservation transient;
  const bool chunk = request_.has_kv() || request_.has_queries();
  const uint32_t layer = request_.has_kv() ? request_.kv().layer() : request_.queries().layer();
  if (chunk && context_->memory != nullptr && plan_ && !assembler_->IsFailed(layer) && !assembler_->IsEnded(layer)) {
    absl::StatusOr<MemoryReservation> r =
        context_->memory->Reserve(message_bytes + DecodedBytes(request_), absl::StrCat("layer ", layer, " (decoding a chunk)"));
    if (!r.ok()) {
      ReportLayerErrorLocked(layer, r.status());
      MaybeReadLocked();
      return;
    }
    transient = *std::move(r);
  }
  HandleRequestLocked();
  request_.Clear();
  MaybeReadLocked();
}

void CompactReactor::HandleRequestLocked() {
  if (request_.msg_case() == v1::CompactRequest::kHeader) {
    HandleHeaderLocked();
    return;
  }
  if (!plan_) {
    StreamErrorLocked(grpc::StatusCode::INVALID_ARGUMENT, "the first message of a Compact stream must be a StreamHeader");
    return;
  }
  uint32_t layer = 0;
  switch (request_.msg_case()) {
    case v1::CompactRequest::kKv: layer = request_.kv().layer(); break;
    case v1::CompactRequest::kQueries: layer = request_.queries().layer(); break;
    case v1::CompactRequest::kLayerEnd: layer = request_.layer_end().layer(); break;
    default:
      StreamErrorLocked(grpc::StatusCode::INVALID_ARGUMENT, "empty CompactRequest (no message set)");
      return;
  }
  if (assembler_->IsFailed(layer)) return;  // its failure was reported once
  if (assembler_->IsEnded(layer)) {
    StreamErrorLocked(grpc::StatusCode::INVALID_ARGUMENT,
                      absl::StrCat("layer ", layer, ": ", request_.has_layer_end() ? "a second LayerEnd" : "a chunk after its LayerEnd",
                                   "; each layer is sent once per stream"));
    return;
  }
  absl::StatusOr<uint64_t> bytes = uint64_t{0};
  const auto start = Clock::now();
  try {
    switch (request_.msg_case()) {
      case v1::CompactRequest::kKv: bytes = assembler_->AddKV(request_.kv()); break;
      case v1::CompactRequest::kQueries: bytes = assembler_->AddQueries(request_.queries()); break;
      default: {  // kLayerEnd
        MemoryReservation memory;
        absl::StatusOr<LayerJob> job = assembler_->EndLayer(layer, &memory);
        if (!job.ok()) {
          ReportLayerErrorLocked(layer, job.status());
          return;
        }
        if (absl::Status fits = context_->worker->backend().CheckFits(*job); !fits.ok()) {
          ReportLayerErrorLocked(layer, fits);
          return;
        }
        const Received received = received_[layer];
        received_.erase(layer);
        context_->metrics->layer_input_bytes.Observe(static_cast<double>(received.bytes));
        SubmitLocked(*std::move(job), std::move(memory), received.decode_seconds);
        return;
      }
    }
  } catch (const std::bad_alloc&) {
    bytes = absl::ResourceExhaustedError("out of host memory while receiving this layer; send fewer tokens or queries per layer");
  }
  if (!bytes.ok()) {
    ReportLayerErrorLocked(layer, bytes.status());
    return;
  }
  Received& received = received_[layer];
  received.decode_seconds += SecondsSince(start);
  received.bytes += *bytes;
  summary_.set_bytes_in(summary_.bytes_in() + *bytes);
  context_->metrics->request_bytes.Increment(static_cast<double>(*bytes));
  context_->metrics->chunk_bytes.Observe(static_cast<double>(*bytes));
  context_->metrics->chunks.Increment();
}

void CompactReactor::HandleHeaderLocked() {
  if (plan_) {
    StreamErrorLocked(grpc::StatusCode::INVALID_ARGUMENT, "a second StreamHeader in one stream");
    return;
  }
  absl::StatusOr<StreamPlan> plan = MakeStreamPlan(request_.header(), context_->profiles);
  if (!plan.ok()) {
    StreamErrorLocked(static_cast<grpc::StatusCode>(plan.status().code()), std::string(plan.status().message()));
    return;
  }
  plan_ = std::make_shared<const StreamPlan>(*std::move(plan));
  assembler_ = std::make_unique<LayerAssembler>(plan_.get(), &context_->limits, context_->memory, context_->threads,
                                                context_->buffers);
  summary_.set_request_id(plan_->request_id);
  summary_.set_backend(std::string(context_->worker->backend_name()));
  started_ = Clock::now();
  // Initial metadata acknowledges a valid header before any result exists: a client may wait for
  // it before sending layers, so that a refused header never races its data (asyncio clients
  // report a write into a finished call as INTERNAL, hiding the real status).
  StartSendInitialMetadata();
  spdlog::debug("stream {}: {} layers x {} kv heads, d={} dv={}", plan_->request_id, plan_->num_layers,
                plan_->num_kv_heads, plan_->head_dim, plan_->value_dim);
}

void CompactReactor::StreamErrorLocked(grpc::StatusCode code, const std::string& message) {
  if (stream_error_) return;
  stream_error_ = grpc::Status(code, message);
  context_->metrics->CountError(CodeName(static_cast<absl::StatusCode>(code)));
  uint64_t suppressed = 0;
  if (context_->log_limiter.Allow(&suppressed)) {
    spdlog::info("stream {} ({}): {}{}", plan_ ? plan_->request_id : "", call_->peer(), message,
                 suppressed ? absl::StrCat(" [", suppressed, " similar lines suppressed]") : "");
  }
  MaybeFinishLocked();
}

void CompactReactor::ReportLayerErrorLocked(uint32_t layer, const absl::Status& status) {
  assembler_->Fail(layer);  // releases its buffers; later chunks of this layer are dropped silently
  received_.erase(layer);
  v1::CompactResponse msg;
  v1::LayerError* err = msg.mutable_layer_error();
  err->set_layer(layer);
  err->set_code(static_cast<int32_t>(status.code()));
  err->set_message(absl::StrCat("layer ", layer, ": ", status.message()));
  summary_.set_layers_failed(summary_.layers_failed() + 1);
  context_->metrics->layers_failed.Increment();
  context_->metrics->CountError(CodeName(status.code()));
  uint64_t suppressed = 0;
  if (context_->log_limiter.Allow(&suppressed)) {
    spdlog::info("stream {}: {}{}", plan_ ? plan_->request_id : "", err->message(),
                 suppressed ? absl::StrCat(" [", suppressed, " similar lines suppressed]") : "");
  }
  QueueWriteLocked(msg);
}

void CompactReactor::SubmitLocked(LayerJob job, MemoryReservation memory, double decode_seconds) {
  const int32_t layer = job.data.layer;
  const uint64_t tokens_in = static_cast<uint64_t>(job.data.tokens * job.data.heads);
  WorkItem item;
  std::shared_ptr<Shared> shared = shared_;
  item.cancelled = [shared] { return shared->cancelled.load(); };
  job.cancelled = item.cancelled;  // a running layer stops at its next head or chunk
  LayerTask task;
  task.job = std::make_shared<LayerJob>(std::move(job));
  task.plan = {plan_->chunk_tokens, plan_->layer_rule, plan_->output_dtype};
  task.buffers = context_->buffers;
  std::shared_ptr<const StreamPlan> plan = plan_;
  Metrics* metrics = context_->metrics;
  const uint64_t max_bytes = context_->limits.max_message_bytes;
  auto held = std::make_shared<MemoryReservation>(std::move(memory));
  // On the worker thread, after the pipeline: encode outside the stream lock; only the hand-over takes it.
  task.done = [shared, held, plan, metrics, max_bytes, layer, tokens_in, decode_seconds](
                  LayerOutcome outcome, double queue_seconds, double run_seconds) {
    held->Release();
    if (outcome.replaced_heads > 0) metrics->fallback_heads.Increment(static_cast<double>(outcome.replaced_heads));
    std::vector<v1::CompactResponse> messages;
    bool ok = false;
    uint64_t tokens_out = 0, bytes_out = 0;
    v1::StageTimes times;
    const absl::StatusOr<LayerResult>& result = outcome.result;
    if (result.ok()) {
      LayerReport lt{decode_seconds, queue_seconds, run_seconds, outcome.device_bytes};
      messages = EncodeLayer(*plan, layer, tokens_in / plan->num_kv_heads, *result, lt, max_bytes, &bytes_out);
      times = messages.back().layer_done().times();
      for (const CompactedHead& h : result->heads) tokens_out += h.indices.size();
      ok = true;
      metrics->layer_seconds.Observe(run_seconds);
      metrics->layer_tokens.Observe(static_cast<double>(tokens_in / plan->num_kv_heads));
      for (const CompactedHead& h : result->heads) {
        if (h.quality.has_quality) metrics->output_error.Observe(h.quality.output_rel_error);
      }
      metrics->ObserveStage("decode", decode_seconds);
      metrics->ObserveStage("queue", queue_seconds);
      metrics->ObserveStage("score", result->seconds.score);
      metrics->ObserveStage("mass_fit", result->seconds.mass_fit);
      metrics->ObserveStage("value_fit", result->seconds.value_fit);
      metrics->ObserveStage("evaluate", result->seconds.evaluate);
    } else {
      v1::CompactResponse msg;
      msg.mutable_layer_error()->set_layer(layer);
      msg.mutable_layer_error()->set_code(static_cast<int32_t>(result.status().code()));
      msg.mutable_layer_error()->set_message(absl::StrCat("layer ", layer, ": ", result.status().message()));
      messages.push_back(std::move(msg));
      metrics->CountError(CodeName(result.status().code()));
    }
    std::lock_guard<std::mutex> lock(shared->mu);
    if (shared->self) {
      shared->self->OnLayerResultLocked(std::move(messages), ok, tokens_in, tokens_out, bytes_out, times);
    }
  };
  item.layer = std::move(task);
  ++in_flight_;
  pending_ = std::move(item);
  TrySubmitPendingLocked();
}

void CompactReactor::TrySubmitPendingLocked() {
  if (!pending_) return;
  std::shared_ptr<Shared> shared = shared_;
  const bool queued = context_->worker->SubmitOrWait(*pending_, [shared] {
    std::lock_guard<std::mutex> lock(shared->mu);
    if (!shared->self) return;
    CompactReactor* self = shared->self;
    self->TrySubmitPendingLocked();
    self->MaybeReadLocked();
  });
  if (queued) pending_.reset();
}

void CompactReactor::OnLayerResultLocked(std::vector<v1::CompactResponse> messages, bool ok,
                                         uint64_t tokens_in, uint64_t tokens_out, uint64_t bytes_out,
                                         const v1::StageTimes& times) {
  --in_flight_;
  if (ok) {
    summary_.set_layers_done(summary_.layers_done() + 1);
    summary_.set_tokens_in(summary_.tokens_in() + tokens_in);
    summary_.set_tokens_out(summary_.tokens_out() + tokens_out);
    summary_.set_bytes_out(summary_.bytes_out() + bytes_out);
    AddStageTimes(times, summary_.mutable_times());
    context_->metrics->layers_ok.Increment();
    context_->metrics->tokens_in.Increment(static_cast<double>(tokens_in));
    context_->metrics->tokens_out.Increment(static_cast<double>(tokens_out));
    context_->metrics->response_bytes.Increment(static_cast<double>(bytes_out));
  } else {
    summary_.set_layers_failed(summary_.layers_failed() + 1);
    context_->metrics->layers_failed.Increment();
  }
  for (const v1::CompactResponse& m : messages) QueueWriteLocked(m);
  MaybeFinishLocked();
}

void CompactReactor::OnTickLocked(Clock::time_point now) {
  if (finished_ || !accepted_) return;
  const double idle = context_->limits.idle_timeout_seconds;
  auto seconds = [&](Clock::time_point t) { return std::chrono::duration<double>(now - t).count(); };
  if (writing_ && idle > 0 && seconds(write_started_) > idle) {
    // A write the client does not take blocks Finish too: cancel the call (RST_STREAM).
    uint64_t suppressed = 0;
    if (context_->log_limiter.Allow(&suppressed)) {
      spdlog::info("stream {} ({}): the client read no response for {} s (idle_timeout_seconds); cancelling it",
                   plan_ ? plan_->request_id : "", call_->peer(), idle);
    }
    context_->metrics->CountError("DEADLINE_EXCEEDED");
    call_->TryCancel();
    return;
  }
  if (assembler_) {
    for (const auto& [layer, reason] :
         assembler_->StaleLayers(now, idle, context_->limits.layer_receive_timeout_seconds)) {
      ReportLayerErrorLocked(layer, absl::DeadlineExceededError(reason));
    }
  }
  if (idle > 0 && !writing_ && writes_.empty() && in_flight_ == 0 && !reads_done_ && seconds(last_read_) > idle) {
    StreamErrorLocked(grpc::StatusCode::DEADLINE_EXCEEDED,
                      absl::StrCat("no message from the client for ", idle,
                                   " s while nothing of this stream was being computed (idle_timeout_seconds)"));
  }
}

void CompactReactor::QueueWriteLocked(const v1::CompactResponse& message) {
  if (finished_ || write_failed_) return;
  Outbound out;
  bool own_buffer = false;
  grpc::SerializationTraits<v1::CompactResponse>::Serialize(message, &out.buffer, &own_buffer);
  out.bytes = out.buffer.Length();
  write_bytes_ += out.bytes;
  if (context_->memory != nullptr) write_memory_.Merge(context_->memory->Account(out.bytes));
  writes_.push_back(std::move(out));
  MaybeWriteLocked();
}

void CompactReactor::MaybeReadLocked() {
  if (reading_ || finished_ || stream_error_ || pending_ || reads_done_ || shared_->cancelled) return;
  if (write_bytes_ > context_->limits.max_outbound_bytes()) return;  // resumes in OnWriteDone
  reading_ = true;
  StartRead(&read_buffer_);
}

void CompactReactor::MaybeWriteLocked() {
  if (writing_ || writes_.empty() || finished_ || write_failed_) return;
  writing_ = true;
  write_started_ = Clock::now();
  StartWrite(&writes_.front().buffer);
}

void CompactReactor::OnWriteDone(bool ok) {
  std::lock_guard<std::mutex> lock(shared_->mu);
  writing_ = false;
  if (!writes_.empty()) {
    write_bytes_ -= writes_.front().bytes;
    write_memory_.ReleasePart(writes_.front().bytes);
    writes_.pop_front();
  }
  if (!ok) write_failed_ = true;
  MaybeWriteLocked();
  MaybeReadLocked();
  MaybeFinishLocked();
}

void CompactReactor::OnCancel() {
  std::lock_guard<std::mutex> lock(shared_->mu);
  shared_->cancelled = true;
  if (pending_) {
    pending_.reset();
    --in_flight_;
  }
  MaybeFinishLocked();
}

void CompactReactor::MaybeFinishLocked() {
  if (finished_ || writing_) return;
  if (shared_->cancelled || write_failed_) {
    // Queued layers of this stream are skipped by the worker; their results find self == null.
    FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "stream cancelled"));
    return;
  }
  if (stream_error_) {
    FinishLocked(*stream_error_);
    return;
  }
  if (!reads_done_ || in_flight_ > 0 || !writes_.empty()) return;
  if (!summary_queued_) {
    summary_queued_ = true;
    summary_.set_wall_seconds(SecondsSince(started_));
    v1::CompactResponse msg;
    *msg.mutable_summary() = summary_;
    QueueWriteLocked(msg);
    return;
  }
  FinishLocked(grpc::Status::OK);
}

void CompactReactor::FinishLocked(const grpc::Status& status) {
  finished_ = true;
  context_->metrics->StreamFinished(CodeName(static_cast<absl::StatusCode>(status.error_code())), SecondsSince(started_));
  // Free the stream slot before the client can see the status, so a client that opens its next
  // stream right after this one ends is not refused for a slot that is about to be free.
  context_->open_streams.fetch_sub(1);
  // Half-sent layers and unwritten responses give their memory back now, not when gRPC is done.
  assembler_.reset();
  received_.clear();
  writes_.clear();
  write_bytes_ = 0;
  write_memory_.Release();
  Finish(status);
}

void CompactReactor::OnDone() {
  {
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->self = nullptr;
    shared_->cancelled = true;  // queued layers of this stream are skipped
  }
  if (accepted_) {
    context_->metrics->streams_in_flight.Decrement();
    context_->live_streams.fetch_sub(1);
  }
  delete this;
}

}  // namespace kvcompact::server
