// Idle layer buffers kept for the next layer. A layer's keys and values are hundreds of MB; a
// fresh allocation of that size is a new mapping whose pages fault in at about 2 GB/s on first
// write, while a reused buffer is written at memory speed. The assembler takes its buffers here and
// the worker gives them back once a layer is compacted; idle bytes are bounded.
#pragma once

#include <cstddef>
#include <mutex>
#include <vector>

#include "core/layer.h"

namespace kvcompact::server {

class HostBufferPool {
 public:
  explicit HostBufferPool(size_t max_idle_bytes) : max_idle_bytes_(max_idle_bytes) {}

  // `count` zeros, in the smallest idle buffer that holds them when there is one.
  std::vector<float> TakeZeroed(size_t count);
  // `count` floats holding whatever their last user left (another stream's data): only for a
  // caller that writes every element before anything reads them (the assembler's keys, values and
  // queries, whose every row must arrive before a layer is complete). Saves a pass over memory.
  std::vector<float> TakeForOverwrite(size_t count);
  // Keeps `v`'s storage for a later take while the idle total stays within the bound, else frees it.
  void Give(std::vector<float>&& v);
  // Gives back a compacted layer's keys, values, bias and queries.
  void GiveLayer(LayerData& data);

  size_t idle_bytes() const;
  size_t max_idle_bytes() const { return max_idle_bytes_; }

 private:
  std::vector<float> TakeIdle(size_t count);  // the smallest idle buffer that holds `count`, or none

  mutable std::mutex mu_;
  std::vector<std::vector<float>> idle_;
  size_t idle_bytes_ = 0;
  const size_t max_idle_bytes_;
};

}  // namespace kvcompact::server
