#include "server/memory_budget.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"

namespace kvcompact::server {

MemoryReservation& MemoryReservation::operator=(MemoryReservation&& other) noexcept {
  if (this != &other) {
    Release();
    budget_ = other.budget_;
    bytes_ = other.bytes_;
    other.budget_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void MemoryReservation::Merge(MemoryReservation&& other) {
  if (other.budget_ == nullptr) return;
  if (budget_ == nullptr) budget_ = other.budget_;
  bytes_ += other.bytes_;
  other.budget_ = nullptr;
  other.bytes_ = 0;
}

void MemoryReservation::Release() {
  if (budget_ != nullptr) {
    budget_->in_use_.fetch_sub(bytes_);
    budget_->Changed();
  }
  budget_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<MemoryReservation> MemoryBudget::Reserve(uint64_t bytes, absl::string_view what) {
  uint64_t used = in_use_.load();
  do {
    if (bytes > limit_ - std::min(used, limit_)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          what, " needs about ", bytes >> 20, " MiB of host memory; ", used >> 20, " of ", limit_ >> 20,
          " MiB (max_host_memory_bytes) are held by layers in flight. ",
          bytes > limit_ ? "Send fewer tokens or queries per layer, or raise the bound"
                         : "Retry later or spread the load over more replicas"));
    }
  } while (!in_use_.compare_exchange_weak(used, used + bytes));
  Changed();
  MemoryReservation r;
  r.budget_ = this;
  r.bytes_ = bytes;
  return r;
}

uint64_t LayerKeyValueBytes(int64_t heads, int64_t tokens, int64_t head_dim, int64_t value_dim) {
  // fp32 K, V and bias, plus one byte per (head, token) for the received-row map.
  return static_cast<uint64_t>(heads * tokens) * (4 * (head_dim + value_dim + 1) + 1);
}

uint64_t LayerQueryBytes(int64_t heads, int64_t tokens, int64_t queries, int64_t head_dim, int64_t value_dim,
                         int threads) {
  constexpr int64_t kLogitRows = 256;  // attention statistics are computed over blocks of query rows
  const uint64_t buffers = static_cast<uint64_t>(heads * queries) * (4 * head_dim + 1);
  const int64_t busy = std::max<int64_t>(1, std::min<int64_t>(heads, threads));
  const uint64_t per_head = 4 * static_cast<uint64_t>(tokens * (head_dim + value_dim + 2) + queries * (head_dim + value_dim + 2) +
                                                      std::min(queries, kLogitRows) * tokens);
  return buffers + busy * per_head;
}

uint64_t DefaultHostMemoryLimit() {
  uint64_t total = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGE_SIZE));
  std::ifstream cgroup("/sys/fs/cgroup/memory.max");  // cgroup v2: the container's limit
  std::string value;
  if (cgroup >> value && value != "max") {
    try {
      total = std::min<uint64_t>(total, std::stoull(value));
    } catch (...) {
    }
  }
  return total / 10 * 7;
}

}  // namespace kvcompact::server
