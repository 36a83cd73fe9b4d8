// Service limits, set from flags; shared by validation, the reactor and GetServerInfo.
#pragma once

#include <cstdint>

namespace kvcompact::server {

struct Limits {
  uint64_t max_message_bytes = 16u << 20;
  uint64_t max_tokens_per_block = 1u << 20;
  uint64_t max_queries_per_layer = 1u << 18;
  uint32_t max_concurrent_streams = 64;
  uint32_t max_open_layers_per_stream = 4;  // layers being received but not yet ended
  uint32_t worker_queue_depth = 4;
  uint64_t max_host_memory_bytes = 0;       // admission bound of layers in flight (0: none)
};

}  // namespace kvcompact::server
