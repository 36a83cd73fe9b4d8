#include "server/layer_response.h"

#include <algorithm>

#include "proto/wire.h"

namespace kvcompact::server {
namespace {

void FillTensor(const float* src, int64_t rows, int64_t cols, DType dtype, v1::Tensor* out) {
  out->set_dtype(DTypeToProto(dtype));
  out->add_shape(rows);
  if (cols > 0) out->add_shape(cols);
  const size_t count = static_cast<size_t>(rows * std::max<int64_t>(cols, 1));
  std::string* data = out->mutable_data();
  data->resize(count * DTypeSize(dtype));
  EncodeFromFloat(src, count, dtype, data->data());
}

}  // namespace

std::vector<v1::CompactResponse> EncodeLayer(const StreamPlan& plan, int32_t layer, int64_t tokens_in,
                                             const LayerResult& result, const LayerReport& times,
                                             uint64_t max_message_bytes, uint64_t* payload_bytes) {
  std::vector<v1::CompactResponse> out;
  const size_t osz = DTypeSize(plan.output_dtype);
  const uint64_t row_bytes = (plan.head_dim + plan.value_dim) * osz + 4 + (plan.return_indices ? 5 : 0);
  // Leave room for framing and field tags.
  const uint64_t budget = max_message_bytes > 8192 ? max_message_bytes - 4096 : max_message_bytes / 2;
  const int64_t rows_per_message = std::max<int64_t>(1, static_cast<int64_t>(budget / row_bytes));
  *payload_bytes = 0;
  v1::CompactResponse done_msg;
  v1::LayerDone* done = done_msg.mutable_layer_done();
  done->set_layer(layer);
  for (size_t h = 0; h < result.heads.size(); ++h) {
    const CompactedHead& head = result.heads[h];
    const int64_t t = static_cast<int64_t>(head.indices.size());
    for (int64_t r0 = 0; r0 < t || (t == 0 && r0 == 0); r0 += rows_per_message) {
      const int64_t rows = std::min(rows_per_message, t - r0);
      v1::CompactResponse msg;
      v1::HeadResult* hr = msg.mutable_head();
      hr->set_layer(layer);
      hr->set_head(static_cast<uint32_t>(h));
      hr->set_row_begin(r0);
      hr->set_head_tokens(t);
      FillTensor(head.keys.data() + r0 * plan.head_dim, rows, plan.head_dim, plan.output_dtype, hr->mutable_keys());
      FillTensor(head.beta.data() + r0, rows, 0, DType::kFloat32, hr->mutable_beta());
      FillTensor(head.values.data() + r0 * plan.value_dim, rows, plan.value_dim, plan.output_dtype, hr->mutable_values());
      if (plan.return_indices) {
        hr->mutable_indices()->Add(head.indices.begin() + r0, head.indices.begin() + r0 + rows);
      }
      *payload_bytes += hr->keys().data().size() + hr->beta().data().size() + hr->values().data().size();
      out.push_back(std::move(msg));
      if (t == 0) break;
    }
    v1::HeadMetrics* m = done->add_heads();
    m->set_head(static_cast<uint32_t>(h));
    m->set_tokens_in(tokens_in);
    m->set_tokens_out(t);
    m->set_has_quality(head.quality.has_quality);
    m->set_output_rel_error(head.quality.output_rel_error);
    m->set_mass_rel_error(head.quality.mass_rel_error);
    m->set_fit_output_rel_error(head.quality.fit_output_rel_error);
    m->set_eval_queries(head.quality.eval_queries);
    m->set_mass_fit_iterations(static_cast<uint32_t>(head.mass_fit_iterations));
    m->set_mass_fit_converged(head.mass_fit_converged);
    m->set_selection_kept(head.selection_kept);
  }
  v1::StageTimes* st = done->mutable_times();
  st->set_decode_seconds(times.decode_seconds);
  st->set_score_seconds(result.seconds.score);
  st->set_mass_fit_seconds(result.seconds.mass_fit);
  st->set_value_fit_seconds(result.seconds.value_fit);
  st->set_evaluate_seconds(result.seconds.evaluate);
  st->set_queue_seconds(times.queue_seconds);
  st->set_total_seconds(times.run_seconds);
  done->set_device_bytes(times.device_bytes);
  out.push_back(std::move(done_msg));
  return out;
}

}  // namespace kvcompact::server
