// CPU backend: the reference implementation, parallel over the heads of a layer.
#include "core/cpu_steps.h"
#include "core/layer.h"
#include "core/pipeline.h"
#include "core/thread_pool.h"

namespace kvcompact {
namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}
  std::string_view name() const override { return "cpu"; }

  absl::StatusOr<LayerResult> CompactLayer(const LayerJob& job) override {
    absl::StatusOr<CompactionPlan> plan = PlanLayer(job);
    if (!plan.ok()) return plan.status();
    const LayerData& data = job.data;
    std::vector<MatrixF> queries(data.heads);
    std::vector<HeadInput> inputs;
    inputs.reserve(data.heads);
    for (int64_t h = 0; h < data.heads; ++h) {
      if (data.queries > 0) queries[h] = data.HeadQueries(h);
      inputs.push_back(HeadInput{data.HeadBlock(h), data.queries > 0 ? &queries[h] : nullptr});
    }
    CpuLayerSteps steps(std::move(inputs), &pool_, job.cancelled);
    return RunLayerPipeline(*plan, steps, &pool_, job.cancelled);
  }

 private:
  ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(int threads) { return std::make_unique<CpuBackend>(threads); }

}  // namespace kvcompact
