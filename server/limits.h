// Service limits, set from flags; shared by validation, the reactor and GetServerInfo.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvcompact::server {

// Largest magnitude accepted in keys, values and queries (the fp16 range; real caches sit far
// inside it), and in a bias. Within these, s * q.k and every fit stay finite in fp32.
inline constexpr float kMaxInputMagnitude = 65504.0f;
inline constexpr float kMaxBiasMagnitude = 1.0e6f;
// Token and query counts index rows with int32 (indices on the wire are uint32, kept int32).
inline constexpr uint64_t kMaxRowsPerLayer = (uint64_t{1} << 31) - 1;
inline constexpr size_t kMaxRequestIdBytes = 256;

struct Limits {
  uint64_t max_message_bytes = 16u << 20;
  uint64_t max_tokens_per_block = 1u << 20;
  uint64_t max_queries_per_layer = 1u << 18;
  uint32_t max_concurrent_streams = 64;
  uint32_t max_open_layers_per_stream = 4;  // layers being received but not yet ended
  uint32_t worker_queue_depth = 4;
  uint64_t max_host_memory_bytes = 0;       // admission bound of layers in flight (0: none)
  // A stream with nothing of it queued or running that receives no message for this long ends
  // DEADLINE_EXCEEDED; a layer that receives no chunk for this long fails DEADLINE_EXCEEDED; a
  // response the client does not read for this long cancels the stream. 0: no timeout.
  double idle_timeout_seconds = 60;
  // A layer must be complete (LayerEnd) this long after its first chunk. 0: no bound.
  double layer_receive_timeout_seconds = 600;
  // Responses of one stream waiting to be written, in bytes, above which the stream stops
  // reading (and so computing) until the client reads: max(4 x max_message_bytes, 64 MiB).
  uint64_t max_outbound_bytes() const {
    return max_message_bytes > (uint64_t{16} << 20) ? 4 * max_message_bytes : uint64_t{64} << 20;
  }
};

}  // namespace kvcompact::server
