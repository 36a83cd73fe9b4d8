// A layer's worth of blocks (all KV heads of one layer) in fp32, and the backend interface that
// compacts it. The server assembles LayerData from wire chunks; backends never see the wire.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/compact_head.h"
#include "core/dtype.h"

namespace kvcompact {

struct LayerData {
  int32_t layer = 0;
  int64_t heads = 0, tokens = 0, queries = 0, head_dim = 0, value_dim = 0;
  float scale = 0;
  std::vector<float> keys;         // heads x tokens x head_dim
  std::vector<float> values;       // heads x tokens x value_dim
  std::vector<float> bias;         // empty (fresh cache) or heads x tokens
  std::vector<float> query_data;   // heads x queries x head_dim (pooled over the GQA group)
  // A dtype every element of keys, values and queries is exact in: the wire's when all three
  // arrived in one 16-bit dtype, else kFloat32. A backend may compute the products in it.
  DType inputs_dtype = DType::kFloat32;

  void Allocate(bool with_bias);   // sizes the buffers from the dimensions
  BlockView HeadBlock(int64_t head) const;
  MatrixF HeadQueries(int64_t head) const;
};

struct LayerJob {
  LayerData data;
  std::vector<int64_t> budgets;    // t per head
  HeadOptions options;             // budget field ignored; taken from `budgets`
  int64_t first_head = 0;          // layer-wide index of data's head 0 (a slice of a larger layer)
  // True once nobody wants the result (the stream is gone, the server is stopping): backends
  // check it before each head and each chunk and then return CANCELLED. Empty: never.
  std::function<bool()> cancelled;
  bool IsCancelled() const { return cancelled && cancelled(); }
};

// Heads [begin, end) of a job as a job of their own: the same per-head results (seeds follow the
// layer-wide head index). Lets a backend split a layer that does not fit its memory.
LayerJob SliceHeads(const LayerJob& job, int64_t begin, int64_t end);

struct LayerResult {
  std::vector<CompactedHead> heads;
  StageSeconds seconds;            // summed over heads (CPU time of the stages)
};

// Heads whose fitted beta or values are not finite, or beyond `max_abs` (the output dtype's
// range: 65504 for fp16), fall back to plain selection (beta = b[S], C_v = V[S], finite for
// finite inputs; CompactedHead::selection_kept set) and get their error figures measured again
// on all of the layer's queries; a figure that still is not finite is dropped (has_quality =
// false). Returns the number of heads replaced, so that a result with status OK never carries NaN
// or Inf.
int64_t ReplaceNonFiniteHeads(const LayerJob& job, float max_abs, LayerResult* result);

// The options of head `head` of a job: its budget and its seed (random selection, query split),
// which depends on the layer-wide head index.
HeadOptions HeadOptionsFor(const LayerJob& job, int64_t head);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  virtual absl::StatusOr<LayerResult> CompactLayer(const LayerJob& job) = 0;
  // A hint from the caller, before it runs the current layer: `next` comes after it. A backend may
  // start moving it to its device meanwhile (holding the pointer until then). Default: nothing.
  virtual void Prefetch(std::shared_ptr<const LayerJob> next) { (void)next; }
  // Device memory held by the backend's buffers, now and at most so far; safe from any thread.
  virtual size_t device_bytes_reserved() const { return 0; }
  virtual size_t device_bytes_peak() const { return 0; }
  // OK when the backend can compact `job` within its memory bounds (checked before the layer is
  // queued, so an impossible layer is refused at once); safe from any thread.
  virtual absl::Status CheckFits(const LayerJob& job) const { (void)job; return absl::OkStatus(); }
  // False once the backend can no longer work (e.g. a sticky CUDA error): the process must restart.
  virtual bool healthy() const { return true; }
};

std::unique_ptr<Backend> MakeCpuBackend(int threads);

}  // namespace kvcompact
