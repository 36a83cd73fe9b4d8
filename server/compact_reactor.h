// One reactor per Compact stream. Reactions only decode, validate and queue: the compute runs on
// the worker, whose results come back through Shared (which outlives the reactor, so a result
// for a stream that has gone is dropped safely). One read and one write in flight at a time;
// reads pause while the worker queue is full.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>

#include "server/layer_assembler.h"
#include "server/layer_response.h"
#include "server/service.h"

namespace kvcompact::server {

class CompactReactor final : public grpc::ServerBidiReactor<v1::CompactRequest, v1::CompactResponse> {
 public:
  // A non-OK `reject` finishes the stream at once (e.g. too many streams).
  CompactReactor(ServiceContext* context, const absl::Status& reject);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  struct Shared {
    std::mutex mu;
    CompactReactor* self = nullptr;  // null once the reactor is done
    std::atomic<bool> cancelled{false};
  };

  void HandleRequestLocked();
  void HandleHeaderLocked();
  void ReportLayerErrorLocked(uint32_t layer, const absl::Status& status);
  void SubmitLocked(LayerJob job, MemoryReservation memory, double decode_seconds);
  void TrySubmitPendingLocked();
  void OnLayerResultLocked(std::vector<v1::CompactResponse> messages, bool ok, uint64_t tokens_in,
                           uint64_t tokens_out, uint64_t bytes_out, const v1::StageTimes& times);
  void QueueWriteLocked(v1::CompactResponse message);
  void MaybeWriteLocked();
  void MaybeFinishLocked();
  void FinishLocked(const grpc::Status& status);

  ServiceContext* const context_;
  std::shared_ptr<Shared> shared_;
  v1::CompactRequest request_;
  std::shared_ptr<const StreamPlan> plan_;
  std::unique_ptr<LayerAssembler> assembler_;
  struct Received {
    double decode_seconds = 0;
    uint64_t bytes = 0;  // payload
  };
  std::map<uint32_t, Received> received_;      // per open layer
  std::optional<WorkItem> pending_;            // waiting for room in the worker queue
  std::deque<v1::CompactResponse> writes_;
  bool accepted_ = false;
  bool writing_ = false;
  bool reads_done_ = false;
  bool write_failed_ = false;
  bool summary_queued_ = false;
  bool finished_ = false;
  std::optional<grpc::Status> stream_error_;   // set: finish with it once no write is in flight
  int in_flight_ = 0;                          // layers queued or running (pending_ included)
  v1::StreamSummary summary_;
  std::chrono::steady_clock::time_point started_;
};

}  // namespace kvcompact::server
