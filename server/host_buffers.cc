#include "server/host_buffers.h"

#include <utility>

namespace kvcompact::server {

std::vector<float> HostBufferPool::TakeIdle(size_t count) {
  std::vector<float> out;
  std::lock_guard<std::mutex> lock(mu_);
  size_t best = idle_.size();
  for (size_t i = 0; i < idle_.size(); ++i) {
    if (idle_[i].capacity() >= count && (best == idle_.size() || idle_[i].capacity() < idle_[best].capacity())) best = i;
  }
  if (best < idle_.size()) {
    out = std::move(idle_[best]);
    idle_[best] = std::move(idle_.back());
    idle_.pop_back();
    idle_bytes_ -= out.capacity() * sizeof(float);
  }
  return out;
}

std::vector<float> HostBufferPool::TakeZeroed(size_t count) {
  std::vector<float> out = TakeIdle(count);
  out.assign(count, 0.f);  // within capacity: no allocation, pages already mapped
  return out;
}

std::vector<float> HostBufferPool::TakeForOverwrite(size_t count) {
  std::vector<float> out = TakeIdle(count);
  out.resize(count);  // shrinking writes nothing; growing within capacity zeroes only the new tail
  return out;
}

void HostBufferPool::Give(std::vector<float>&& v) {
  std::vector<float> freed = std::move(v);
  const size_t bytes = freed.capacity() * sizeof(float);
  if (bytes == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (idle_bytes_ + bytes > max_idle_bytes_) return;  // `freed` is released on return
  idle_bytes_ += bytes;
  idle_.push_back(std::move(freed));
}

void HostBufferPool::GiveLayer(LayerData& data) {
  for (auto* v : {&data.keys, &data.values, &data.bias, &data.query_data}) Give(std::move(*v));
}

size_t HostBufferPool::idle_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return idle_bytes_;
}

}  // namespace kvcompact::server
