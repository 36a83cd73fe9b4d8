// CPU backend: the reference implementation, parallel over the heads of a layer.
#include <mutex>

#include "absl/strings/str_cat.h"
#include "core/layer.h"
#include "core/thread_pool.h"

namespace kvcompact {
namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}
  std::string_view name() const override { return "cpu"; }

  absl::StatusOr<LayerResult> CompactLayer(const LayerJob& job) override {
    const LayerData& data = job.data;
    if (static_cast<int64_t>(job.budgets.size()) != data.heads) {
      return absl::InvalidArgumentError("one budget per head is required");
    }
    LayerResult result;
    result.heads.resize(data.heads);
    std::vector<StageSeconds> seconds(data.heads);
    std::vector<absl::Status> status(data.heads);
    pool_.ParallelFor(data.heads, [&](int64_t h) {
      if (job.IsCancelled()) {
        status[h] = absl::CancelledError("the stream is gone or the server is stopping");
        return;
      }
      const HeadOptions options = HeadOptionsFor(job, h);
      const MatrixF queries = data.HeadQueries(h);
      auto head = CompactHead(data.HeadBlock(h), data.queries > 0 ? &queries : nullptr, options,
                              &seconds[h]);
      if (head.ok()) {
        result.heads[h] = *std::move(head);
      } else {
        status[h] = head.status();
      }
    });
    for (int64_t h = 0; h < data.heads; ++h) {
      if (!status[h].ok()) {
        return absl::Status(status[h].code(), absl::StrCat("head ", h, ": ", status[h].message()));
      }
      result.seconds += seconds[h];
    }
    return result;
  }

 private:
  ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(int threads) { return std::make_unique<CpuBackend>(threads); }

}  // namespace kvcompact
