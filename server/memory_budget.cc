#include "server/memory_budget.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/method.h"

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

void MemoryReservation::ReleasePart(uint64_t bytes) {
  bytes = std::min(bytes, bytes_);
  if (budget_ == nullptr || bytes == 0) return;
  bytes_ -= bytes;
  budget_->in_use_.fetch_sub(bytes);
  budget_->Changed();
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

MemoryReservation MemoryBudget::Account(uint64_t bytes) {
  in_use_.fetch_add(bytes);
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

uint64_t LayerMethodBytes(const LayerJob& job, const LayerAllocation& rule, int64_t chunk_tokens, int threads) {
  const LayerData& d = job.data;
  const double T = static_cast<double>(d.tokens), n = static_cast<double>(d.queries);
  const double busy = static_cast<double>(std::max<int64_t>(1, std::min<int64_t>(d.heads, threads)));
  double bytes = 0;
  const MethodSpec& spec = GetMethodSpec(job.options.method);
  if (spec.selection == Selection::kOmp) {
    int64_t t = 1;
    for (int64_t b : job.budgets) t = std::max(t, std::min(b, d.tokens));
    if (rule.kind != LayerAllocation::Kind::kNone) {  // the split may give one head up to head_cap x T
      t = std::max(t, std::min(d.tokens, static_cast<int64_t>(rule.head_cap * T)));
    }
    const double pool = static_cast<double>(OmpPoolSize(job.options.omp_pool, t, d.tokens));
    // Gram in fp32 then fp64 (12 P^2), the fitting queries' logits and weights over the pool
    // (8 n P), the greedy loop's factor (8 t^2).
    bytes += busy * (12.0 * pool * pool + 8.0 * n * pool + 8.0 * static_cast<double>(t) * static_cast<double>(t));
  }
  if (rule.kind == LayerAllocation::Kind::kSensitivity) {
    bytes += static_cast<double>(d.heads) * (T * static_cast<double>(d.head_dim + d.value_dim + 1) * 4.0 +
                                             std::min<double>(n, rule.probe_queries) * static_cast<double>(d.head_dim) * 4.0);
  }
  if (chunk_tokens > 0 && d.tokens > chunk_tokens) {
    bytes += static_cast<double>(d.heads) * (static_cast<double>(chunk_tokens) * static_cast<double>(d.head_dim + d.value_dim + 1) * 4.0 +
                                             n * static_cast<double>(d.head_dim) * 4.0);
  }
  return bytes >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(bytes);
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
