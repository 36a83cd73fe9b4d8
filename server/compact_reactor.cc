#include "server/compact_reactor.h"

#include <spdlog/spdlog.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/chunked.h"
#include "proto/wire.h"

namespace kvcompact::server {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

std::string CodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

}  // namespace

CompactReactor::CompactReactor(ServiceContext* context, const absl::Status& reject)
    : context_(context), shared_(std::make_shared<Shared>()), started_(std::chrono::steady_clock::now()) {
  shared_->self = this;
  std::lock_guard<std::mutex> lock(shared_->mu);
  if (!reject.ok()) {
    context_->metrics->CountError(CodeName(reject.code()));
    FinishLocked(ToGrpc(reject));
    return;
  }
  accepted_ = true;
  context_->metrics->streams_started.Increment();
  context_->metrics->streams_in_flight.Increment();
  StartRead(&request_);
}

void CompactReactor::OnReadDone(bool ok) {
  std::lock_guard<std::mutex> lock(shared_->mu);
  if (finished_) return;
  if (!ok) {  // half-close by the client, or the stream broke (OnCancel tells which)
    reads_done_ = true;
    if (!plan_ && !shared_->cancelled) stream_error_ = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "stream closed before a StreamHeader was sent");
    MaybeFinishLocked();
    return;
  }
  HandleRequestLocked();
  if (!finished_ && !stream_error_ && !pending_) StartRead(&request_);
}

void CompactReactor::HandleRequestLocked() {
  if (request_.msg_case() == v1::CompactRequest::kHeader) {
    HandleHeaderLocked();
    return;
  }
  if (!plan_) {
    stream_error_ = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the first message of a Compact stream must be a StreamHeader");
    context_->metrics->CountError("INVALID_ARGUMENT");
    MaybeFinishLocked();
    return;
  }
  uint32_t layer = 0;
  absl::StatusOr<uint64_t> bytes = uint64_t{0};
  const auto start = std::chrono::steady_clock::now();
  switch (request_.msg_case()) {
    case v1::CompactRequest::kKv:
      layer = request_.kv().layer();
      if (assembler_->IsClosed(layer)) return;  // already failed or ended: reported once
      bytes = assembler_->AddKV(request_.kv());
      break;
    case v1::CompactRequest::kQueries:
      layer = request_.queries().layer();
      if (assembler_->IsClosed(layer)) return;
      bytes = assembler_->AddQueries(request_.queries());
      break;
    case v1::CompactRequest::kLayerEnd: {
      layer = request_.layer_end().layer();
      if (assembler_->IsClosed(layer)) return;
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
    default:
      stream_error_ = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "empty CompactRequest (no message set)");
      MaybeFinishLocked();
      return;
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
    stream_error_ = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "a second StreamHeader in one stream");
    context_->metrics->CountError("INVALID_ARGUMENT");
    MaybeFinishLocked();
    return;
  }
  absl::StatusOr<StreamPlan> plan = MakeStreamPlan(request_.header(), context_->profiles);
  if (!plan.ok()) {
    stream_error_ = ToGrpc(plan.status());
    context_->metrics->CountError(CodeName(plan.status().code()));
    MaybeFinishLocked();
    return;
  }
  plan_ = std::make_shared<const StreamPlan>(*std::move(plan));
  assembler_ = std::make_unique<LayerAssembler>(plan_.get(), &context_->limits, context_->memory, context_->threads);
  summary_.set_request_id(plan_->request_id);
  summary_.set_backend(std::string(context_->worker->backend_name()));
  started_ = std::chrono::steady_clock::now();
  spdlog::debug("stream {}: {} layers x {} kv heads, d={} dv={}", plan_->request_id, plan_->num_layers,
                plan_->num_kv_heads, plan_->head_dim, plan_->value_dim);
}

void CompactReactor::ReportLayerErrorLocked(uint32_t layer, const absl::Status& status) {
  assembler_->Close(layer);  // later chunks of this layer (known or not) are dropped silently
  received_.erase(layer);
  v1::CompactResponse msg;
  v1::LayerError* err = msg.mutable_layer_error();
  err->set_layer(layer);
  err->set_code(static_cast<int32_t>(status.code()));
  err->set_message(absl::StrCat("layer ", layer, ": ", status.message()));
  summary_.set_layers_failed(summary_.layers_failed() + 1);
  context_->metrics->layers_failed.Increment();
  context_->metrics->CountError(CodeName(status.code()));
  spdlog::info("stream {}: {}", plan_ ? plan_->request_id : "", err->message());
  QueueWriteLocked(std::move(msg));
}

void CompactReactor::SubmitLocked(LayerJob job, MemoryReservation memory, double decode_seconds) {
  const int32_t layer = job.data.layer;
  const uint64_t tokens_in = static_cast<uint64_t>(job.data.tokens * job.data.heads);
  WorkItem item;
  std::shared_ptr<Shared> shared = shared_;
  item.cancelled = [shared] { return shared->cancelled.load(); };
  auto owned_job = std::make_shared<LayerJob>(std::move(job));
  item.job = owned_job;
  std::shared_ptr<const StreamPlan> plan = plan_;
  Metrics* metrics = context_->metrics;
  const uint64_t max_bytes = context_->limits.max_message_bytes;
  auto held = std::make_shared<MemoryReservation>(std::move(memory));
  item.run = [shared, owned_job, held, plan, metrics, max_bytes, layer, tokens_in, decode_seconds](
                 Backend* backend, double queue_seconds) mutable {
    // Compute and encode outside the stream lock; only the hand-over takes it.
    std::vector<v1::CompactResponse> messages;
    bool ok = false;
    uint64_t tokens_out = 0, bytes_out = 0;
    v1::StageTimes times;
    absl::StatusOr<LayerResult> result = absl::CancelledError("stream cancelled or server shutting down");
    const auto start = std::chrono::steady_clock::now();
    if (backend && plan->chunk_tokens > 0 && owned_job->data.tokens > plan->chunk_tokens) {
      result = CompactLayerInChunks(*backend, *owned_job, plan->chunk_tokens, plan->layer_rule);
    } else if (backend) {
      absl::Status allocated = AllocateLayer(*backend, owned_job.get(), plan->layer_rule);
      result = allocated.ok() ? backend->CompactLayer(*owned_job) : absl::StatusOr<LayerResult>(allocated);
    }
    owned_job.reset();  // free the layer's inputs before encoding its outputs
    held->Release();
    const double run_seconds = SecondsSince(start);
    if (result.ok()) {
      LayerTimes lt{decode_seconds, queue_seconds, run_seconds};
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
    if (!self->pending_ && !self->finished_ && !self->stream_error_ && !self->reads_done_) {
      self->StartRead(&self->request_);
    }
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
  for (v1::CompactResponse& m : messages) QueueWriteLocked(std::move(m));
  MaybeFinishLocked();
}

void CompactReactor::QueueWriteLocked(v1::CompactResponse message) {
  if (finished_ || write_failed_) return;
  writes_.push_back(std::move(message));
  MaybeWriteLocked();
}

void CompactReactor::MaybeWriteLocked() {
  if (writing_ || writes_.empty() || finished_ || write_failed_) return;
  writing_ = true;
  StartWrite(&writes_.front());
}

void CompactReactor::OnWriteDone(bool ok) {
  std::lock_guard<std::mutex> lock(shared_->mu);
  writing_ = false;
  if (!writes_.empty()) writes_.pop_front();
  if (!ok) write_failed_ = true;
  MaybeWriteLocked();
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
    QueueWriteLocked(std::move(msg));
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
  Finish(status);
}

void CompactReactor::OnDone() {
  {
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->self = nullptr;
    shared_->cancelled = true;  // queued layers of this stream are skipped
  }
  if (accepted_) context_->metrics->streams_in_flight.Decrement();
  delete this;
}

}  // namespace kvcompact::server
