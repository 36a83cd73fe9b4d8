// One reactor per Compact stream. Reactions only parse, validate and queue: the compute runs on
// the worker, whose results come back through Shared (which outlives the reactor, so a result
// for a stream that has gone is dropped safely). One read and one write in flight at a time;
// reads pause while the worker queue is full or while the stream's unwritten responses exceed
// Limits::max_outbound_bytes (a client that does not read stops being served). The watchdog
// ends idle streams, stalled layers and streams whose client stopped reading.
//
// The method is registered raw (grpc::ByteBuffer) so that a message that does not parse ends the
// stream INVALID_ARGUMENT instead of looking like a half-close, and so that the bytes of queued
// responses are known exactly (they are counted in host-memory admission).
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>

#include <grpcpp/support/byte_buffer.h>

#include "server/layer_assembler.h"
#include "server/layer_response.h"
#include "server/service.h"

namespace kvcompact::server {

class CompactReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  // A non-OK `reject` finishes the stream at once (e.g. too many streams).
  CompactReactor(ServiceContext* context, grpc::CallbackServerContext* call, const absl::Status& reject);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  using Clock = std::chrono::steady_clock;
  struct Shared {
    std::mutex mu;
    CompactReactor* self = nullptr;  // null once the reactor is done
    std::atomic<bool> cancelled{false};
  };
  struct Outbound {
    grpc::ByteBuffer buffer;
    uint64_t bytes = 0;
  };

  void HandleRequestLocked();
  void HandleHeaderLocked();
  void ReportLayerErrorLocked(uint32_t layer, const absl::Status& status);
  void StreamErrorLocked(grpc::StatusCode code, const std::string& message);
  void SubmitLocked(LayerJob job, MemoryReservation memory, double decode_seconds);
  void TrySubmitPendingLocked();
  void OnLayerResultLocked(std::vector<v1::CompactResponse> messages, bool ok, uint64_t tokens_in,
                           uint64_t tokens_out, uint64_t bytes_out, const v1::StageTimes& times);
  // Watchdog: timeouts of the stream, its open layers and its writes.
  void OnTickLocked(Clock::time_point now);
  void QueueWriteLocked(const v1::CompactResponse& message);
  void MaybeReadLocked();
  void MaybeWriteLocked();
  void MaybeFinishLocked();
  void FinishLocked(const grpc::Status& status);

  ServiceContext* const context_;
  grpc::CallbackServerContext* const call_;
  std::shared_ptr<Shared> shared_;
  grpc::ByteBuffer read_buffer_;
  v1::CompactRequest request_;
  std::shared_ptr<const StreamPlan> plan_;
  std::unique_ptr<LayerAssembler> assembler_;
  struct Received {
    double decode_seconds = 0;
    uint64_t bytes = 0;  // payload
  };
  std::map<uint32_t, Received> received_;      // per open layer
  std::optional<WorkItem> pending_;            // waiting for room in the worker queue
  std::deque<Outbound> writes_;
  uint64_t write_bytes_ = 0;                   // bytes in writes_
  MemoryReservation write_memory_;             // write_bytes_, counted in admission
  bool accepted_ = false;
  bool reading_ = false;
  bool writing_ = false;
  bool reads_done_ = false;
  bool write_failed_ = false;
  bool summary_queued_ = false;
  bool finished_ = false;
  std::optional<grpc::Status> stream_error_;   // set: finish with it once no write is in flight
  int in_flight_ = 0;                          // layers queued or running (pending_ included)
  uint64_t messages_read_ = 0;
  v1::StreamSummary summary_;
  Clock::time_point started_;
  Clock::time_point last_read_;                // last message from the client (or the start)
  Clock::time_point write_started_;            // the write in flight began
};

}  // namespace kvcompact::server
