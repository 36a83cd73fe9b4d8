#include "core/chunked.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "core/attention.h"
#include "core/budget.h"
#include "core/compact_head.h"

namespace kvcompact {
namespace {

// Rows [begin, end) of every head of a job, with the layer's queries.
LayerJob ChunkJob(const LayerJob& job, int64_t begin, int64_t end) {
  const LayerData& d = job.data;
  const int64_t rows = end - begin;
  LayerJob out;
  out.options = job.options;
  out.first_head = job.first_head;  // same seeds per head in every chunk: one held-out split
  out.cancelled = job.cancelled;
  out.data = LayerData{d.layer, d.heads, rows, d.queries, d.head_dim, d.value_dim, d.scale, {}, {}, {}, d.query_data, d.inputs_dtype};
  auto rows_of = [&](const std::vector<float>& v, int64_t width) {
    std::vector<float> o;
    if (v.empty()) return o;
    o.reserve(static_cast<size_t>(d.heads * rows * width));
    for (int64_t h = 0; h < d.heads; ++h) {
      const float* src = v.data() + (h * d.tokens + begin) * width;
      o.insert(o.end(), src, src + rows * width);
    }
    return o;
  };
  out.data.keys = rows_of(d.keys, d.head_dim);
  out.data.values = rows_of(d.values, d.value_dim);
  out.data.bias = rows_of(d.bias, 1);
  return out;
}

void AppendChunk(const CompactedHead& part, int64_t offset, CompactedHead* whole) {
  const Eigen::Index t0 = whole->keys.rows(), t = part.keys.rows();
  for (int32_t i : part.indices) whole->indices.push_back(static_cast<int32_t>(i + offset));
  whole->keys.conservativeResize(t0 + t, part.keys.cols());
  whole->keys.bottomRows(t) = part.keys;
  whole->values.conservativeResize(t0 + t, part.values.cols());
  whole->values.bottomRows(t) = part.values;
  whole->beta.conservativeResize(t0 + t);
  whole->beta.tail(t) = part.beta;
  whole->mass_fit_converged = whole->mass_fit_converged && part.mass_fit_converged;
  whole->mass_fit_iterations = std::max(whole->mass_fit_iterations, part.mass_fit_iterations);
  whole->selection_kept = whole->selection_kept || part.selection_kept;  // in at least one chunk
}

}  // namespace

std::vector<int64_t> ChunkBounds(int64_t tokens, int64_t chunk_tokens) {
  const int64_t chunks = std::max<int64_t>(1, (tokens + chunk_tokens - 1) / std::max<int64_t>(1, chunk_tokens));
  std::vector<int64_t> bounds(chunks + 1);
  for (int64_t c = 0; c <= chunks; ++c) bounds[c] = tokens * c / chunks;
  return bounds;
}

absl::StatusOr<LayerResult> CompactLayerInChunks(Backend& backend, const LayerJob& job, int64_t chunk_tokens,
                                                 const LayerAllocation& rule) {
  const LayerData& d = job.data;
  if (static_cast<int64_t>(job.budgets.size()) != d.heads) return absl::InvalidArgumentError("one budget per head is required");
  const std::vector<int64_t> bounds = ChunkBounds(d.tokens, chunk_tokens);
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<int64_t> lengths(chunks);
  for (int64_t c = 0; c < chunks; ++c) lengths[c] = bounds[c + 1] - bounds[c];
  const std::vector<double> shares(lengths.begin(), lengths.end());

  // budget[c][h]: head h's t split over the chunks in proportion to their lengths.
  std::vector<std::vector<int64_t>> budget(chunks, std::vector<int64_t>(d.heads));
  for (int64_t h = 0; h < d.heads; ++h) {
    const int64_t t = KeptKeys(job.budgets[h], d.tokens);
    if (t < chunks) {
      return absl::InvalidArgumentError(absl::StrCat("head ", h, ": a budget of ", t, " cannot cover ", chunks,
                                                     " chunks of ", chunk_tokens, " tokens (raise chunk_tokens)"));
    }
    absl::StatusOr<std::vector<int64_t>> split = WaterFill(shares, lengths, t);
    if (!split.ok()) return split.status();
    for (int64_t c = 0; c < chunks; ++c) budget[c][h] = (*split)[c];
  }

  LayerResult result;
  result.heads.resize(d.heads);
  std::vector<float> fit_error(d.heads, 0.f);
  for (int64_t c = 0; c < chunks; ++c) {
    if (job.IsCancelled()) return absl::CancelledError("the stream is gone or the server is stopping");
    LayerJob part = ChunkJob(job, bounds[c], bounds[c + 1]);
    part.budgets = budget[c];
    if (auto s = AllocateLayer(backend, &part, rule); !s.ok()) return s;
    absl::StatusOr<LayerResult> r = backend.CompactLayer(part);
    if (!r.ok()) return absl::Status(r.status().code(), absl::StrCat("chunk ", c, ": ", r.status().message()));
    for (int64_t h = 0; h < d.heads; ++h) {
      AppendChunk(r->heads[h], bounds[c], &result.heads[h]);
      fit_error[h] += r->heads[h].quality.fit_output_rel_error / static_cast<float>(chunks);
    }
    result.seconds += r->seconds;
  }

  if (d.queries > 0) {
    // Quality of the concatenated block against the whole block, on the held-out queries.
    for (int64_t h = 0; h < d.heads; ++h) {
      const HeadOptions o = HeadOptionsFor(job, h);
      MatrixF fit_q, eval_q;
      SplitQueries(d.HeadQueries(h), o.holdout_fraction, o.seed, &fit_q, &eval_q);
      const MatrixF& q = eval_q.rows() > 0 ? eval_q : fit_q;
      const MatrixF sample = q.topRows(std::min<int64_t>(q.rows(), kChunkedEvalQueries));
      const AttentionStats truth = ComputeAttentionStats(d.HeadBlock(h), sample, std::nullopt, o.query_chunk);
      HeadQuality& quality = result.heads[h].quality;
      quality.has_quality = true;
      MeasureErrors(result.heads[h], sample, truth, d.scale, &quality.output_rel_error, &quality.mass_rel_error);
      quality.eval_queries = sample.rows();
      quality.fit_output_rel_error = fit_error[h];  // the chunks' own fit errors, averaged
    }
  }
  return result;
}

}  // namespace kvcompact
