#include "server/layer_assembler.h"

#include <algorithm>
#include <cmath>
#include <new>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "proto/wire.h"

namespace kvcompact::server {
namespace {

using absl::InvalidArgumentError;
using absl::StrCat;

// The one dtype a layer's keys, values and queries arrived in, or kFloat32 once two differ.
void NoteWireDType(std::optional<DType>& wire, DType dtype) {
  wire = !wire || *wire == dtype ? dtype : DType::kFloat32;
}

std::string ShapeString(const v1::Tensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.shape_size(); ++i) s += StrCat(i ? ", " : "", t.shape(i));
  return s + "]";
}

// Checks dtype, shape and byte count of `t` against `shape` (validated dimensions; the element
// count is still computed with overflow checks) and returns its dtype.
absl::StatusOr<DType> CheckTensor(const v1::Tensor& t, absl::string_view name, const std::vector<int64_t>& shape) {
  auto dtype = DTypeFromProto(t.dtype());
  if (!dtype.ok()) return InvalidArgumentError(StrCat(name, ": ", dtype.status().message()));
  bool same = t.shape_size() == static_cast<int>(shape.size());
  for (size_t i = 0; same && i < shape.size(); ++i) same = t.shape(i) == shape[i];
  std::string want = "[";
  for (size_t i = 0; i < shape.size(); ++i) want += StrCat(i ? ", " : "", shape[i]);
  want += "]";
  if (!same) return InvalidArgumentError(StrCat(name, ": shape ", ShapeString(t), ", expected ", want));
  uint64_t count = 1, bytes = 0;
  for (int64_t s : shape) {
    if (s < 0 || __builtin_mul_overflow(count, static_cast<uint64_t>(s), &count)) {
      return InvalidArgumentError(StrCat(name, ": shape ", want, " has too many elements"));
    }
  }
  if (__builtin_mul_overflow(count, static_cast<uint64_t>(DTypeSize(*dtype)), &bytes)) {
    return InvalidArgumentError(StrCat(name, ": shape ", want, " has too many elements"));
  }
  if (t.data().size() != bytes) {
    return InvalidArgumentError(StrCat(name, ": ", t.data().size(), " bytes for shape ", want, " of ",
                                       std::string(DTypeName(*dtype)), ", expected ", bytes));
  }
  return *dtype;
}

// Decodes a checked [heads, rows, width] tensor to fp32 straight into the layer's buffer: head h's
// rows go to dst + (head_begin + h) * head_stride + row_offset (elements), with the magnitude
// check of DecodeToFloat. No staging copy: a chunk's bytes are read once.
absl::Status DecodeRowsInto(const v1::Tensor& t, DType dtype, absl::string_view name, int64_t heads, int64_t rows,
                            int64_t width, float max_abs, float* dst, int64_t head_begin, int64_t head_stride,
                            int64_t row_offset) {
  const size_t per_head = static_cast<size_t>(rows * width);
  const char* src = t.data().data();
  for (int64_t h = 0; h < heads; ++h) {
    absl::Status s = DecodeToFloat(src + h * per_head * DTypeSize(dtype), dtype, per_head,
                                   dst + (head_begin + h) * head_stride + row_offset, max_abs);
    if (!s.ok()) return InvalidArgumentError(StrCat(name, ": ", s.message(), " of KV head ", head_begin + h, "'s rows"));
  }
  return absl::OkStatus();
}

// [begin, begin + rows) within [0, total), without wrapping: rows in [1, total], begin <= total - rows.
bool RowsWithin(uint64_t begin, int64_t rows, int64_t total) {
  return rows > 0 && rows <= total && begin <= static_cast<uint64_t>(total - rows);
}

absl::Status CheckHeads(uint32_t begin, uint32_t end, uint32_t heads) {
  if (begin >= end || end > heads) {
    return InvalidArgumentError(StrCat("head range [", begin, ", ", end, ") is not within [0, ", heads, ")"));
  }
  return absl::OkStatus();
}

// Marks rows [begin, begin + rows) of each head as received; fails on overlap.
absl::Status MarkRows(std::vector<uint8_t>& seen, int64_t per_head, uint32_t h0, uint32_t h1,
                      int64_t begin, int64_t rows, absl::string_view what) {
  for (uint32_t h = h0; h < h1; ++h) {
    uint8_t* row = seen.data() + h * per_head + begin;
    if (std::find(row, row + rows, 1) != row + rows) {
      return InvalidArgumentError(StrCat(what, " rows [", begin, ", ", begin + rows, ") of head ", h,
                                         " were already sent"));
    }
  }
  for (uint32_t h = h0; h < h1; ++h) std::fill_n(seen.data() + h * per_head + begin, rows, 1);
  return absl::OkStatus();
}

// "head 1 rows [100, 4096)": the first gap, for a precise message.
std::string FirstGap(const std::vector<uint8_t>& seen, int64_t per_head) {
  const auto it = std::find(seen.begin(), seen.end(), 0);
  const int64_t pos = it - seen.begin();
  const int64_t head = pos / per_head, begin = pos % per_head;
  int64_t end = begin;
  while (end < per_head && seen[head * per_head + end] == 0) ++end;
  return StrCat("head ", head, " rows [", begin, ", ", end, ")");
}

}  // namespace

void LayerAssembler::Fail(uint32_t layer) {
  open_.erase(layer);
  failed_.insert(layer);
}

std::vector<std::pair<uint32_t, std::string>> LayerAssembler::StaleLayers(std::chrono::steady_clock::time_point now,
                                                                          double idle, double max_age) const {
  std::vector<std::pair<uint32_t, std::string>> out;
  auto seconds = [&](std::chrono::steady_clock::time_point t) { return std::chrono::duration<double>(now - t).count(); };
  for (const auto& [layer, p] : open_) {
    if (idle > 0 && seconds(p.last_chunk) > idle) {
      out.emplace_back(layer, StrCat("no chunk of this layer for ", idle, " s (idle_timeout_seconds); its buffers were released"));
    } else if (max_age > 0 && seconds(p.opened) > max_age) {
      out.emplace_back(layer, StrCat("the layer was not complete ", max_age,
                                     " s after its first chunk (layer_receive_timeout_seconds); its buffers were released"));
    }
  }
  return out;
}

std::vector<uint32_t> LayerAssembler::OpenLayers() const {
  std::vector<uint32_t> out;
  for (const auto& [layer, pending] : open_) out.push_back(layer);
  return out;
}

absl::Status LayerAssembler::Reserve(Pending& p, uint64_t bytes, absl::string_view what) {
  if (memory_ == nullptr) return absl::OkStatus();
  absl::StatusOr<MemoryReservation> r = memory_->Reserve(bytes, StrCat("layer ", p.data.layer, " (", what, ")"));
  if (!r.ok()) return r.status();
  p.memory.Merge(*std::move(r));
  return absl::OkStatus();
}

absl::StatusOr<LayerAssembler::Pending*> LayerAssembler::OpenLayer(uint32_t layer) {
  if (layer >= plan_->num_layers) {
    return InvalidArgumentError(StrCat("layer ", layer, " is not within [0, ", plan_->num_layers, ")"));
  }
  auto it = open_.find(layer);
  if (it != open_.end()) {
    it->second.last_chunk = std::chrono::steady_clock::now();
    return &it->second;
  }
  if (open_.size() >= limits_->max_open_layers_per_stream) {
    return absl::ResourceExhaustedError(StrCat("more than ", limits_->max_open_layers_per_stream,
                                               " layers open at once in one stream; end a layer first"));
  }
  Pending& p = open_[layer];
  p.opened = p.last_chunk = std::chrono::steady_clock::now();
  p.data.layer = static_cast<int32_t>(layer);
  p.data.heads = plan_->num_kv_heads;
  p.data.head_dim = plan_->head_dim;
  p.data.value_dim = plan_->value_dim;
  p.data.scale = plan_->scale;
  return &p;
}

std::vector<float> LayerAssembler::Zeroed(int64_t count) {
  const size_t n = static_cast<size_t>(count);
  return buffers_ != nullptr ? buffers_->TakeZeroed(n) : std::vector<float>(n, 0.f);
}

// For keys, values and queries: EndLayer refuses a layer until every row was written (kv_seen,
// query_seen), so a reused buffer's old contents are never read.
std::vector<float> LayerAssembler::ForOverwrite(int64_t count) {
  const size_t n = static_cast<size_t>(count);
  return buffers_ != nullptr ? buffers_->TakeForOverwrite(n) : std::vector<float>(n, 0.f);
}

absl::StatusOr<uint64_t> LayerAssembler::AddKV(const v1::KVChunk& c) {
  auto opened = OpenLayer(c.layer());
  if (!opened.ok()) return opened.status();
  Pending& p = **opened;
  LayerData& d = p.data;
  if (absl::Status s = CheckHeads(c.head_begin(), c.head_end(), plan_->num_kv_heads); !s.ok()) return s;
  if (c.layer_tokens() == 0 || c.layer_tokens() > limits_->max_tokens_per_block) {
    return InvalidArgumentError(StrCat("layer_tokens ", c.layer_tokens(), " is not within [1, ",
                                       limits_->max_tokens_per_block, "] (max_tokens_per_block)"));
  }
  if (d.tokens == 0) {
    const int64_t T = static_cast<int64_t>(c.layer_tokens());
    uint64_t need = LayerKeyValueBytes(d.heads, T, d.head_dim, d.value_dim);
    if (d.queries > 0) need += LayerQueryBytes(d.heads, T, d.queries, d.head_dim, d.value_dim, threads_);
    if (absl::Status s = Reserve(p, need, StrCat(T, " tokens")); !s.ok()) return s;
    d.tokens = T;
    d.keys = ForOverwrite(d.heads * d.tokens * d.head_dim);
    d.values = ForOverwrite(d.heads * d.tokens * d.value_dim);
    p.kv_seen.assign(d.heads * d.tokens, 0);
  } else if (d.tokens != static_cast<int64_t>(c.layer_tokens())) {
    return InvalidArgumentError(StrCat("layer_tokens ", c.layer_tokens(), " differs from ", d.tokens,
                                       " in an earlier chunk of this layer"));
  }
  const int64_t heads = c.head_end() - c.head_begin();
  const int64_t rows = c.keys().shape_size() == 3 ? c.keys().shape(1) : -1;
  if (rows <= 0) return InvalidArgumentError(StrCat("keys: shape ", ShapeString(c.keys()), ", expected [heads, rows, head_dim]"));
  if (!RowsWithin(c.token_begin(), rows, d.tokens)) {
    return InvalidArgumentError(StrCat("tokens [", c.token_begin(), ", ", c.token_begin(), " + ", rows,
                                       ") are not within layer_tokens ", d.tokens));
  }
  const bool has_bias = c.has_bias() && c.bias().shape_size() > 0;
  auto key_type = CheckTensor(c.keys(), "keys", {heads, rows, d.head_dim});
  if (!key_type.ok()) return key_type.status();
  auto value_type = CheckTensor(c.values(), "values", {heads, rows, d.value_dim});
  if (!value_type.ok()) return value_type.status();
  NoteWireDType(p.wire, *key_type);
  NoteWireDType(p.wire, *value_type);
  absl::StatusOr<DType> bias_type = DType::kFloat32;
  if (has_bias && !(bias_type = CheckTensor(c.bias(), "bias", {heads, rows})).ok()) return bias_type.status();
  // Rows are marked before they are written: a chunk that overlaps an earlier one is refused
  // before it can overwrite it. Any error below fails the whole layer.
  if (auto s = MarkRows(p.kv_seen, d.tokens, c.head_begin(), c.head_end(), c.token_begin(), rows, "token");
      !s.ok()) {
    return s;
  }
  const int64_t t0 = static_cast<int64_t>(c.token_begin());
  if (auto s = DecodeRowsInto(c.keys(), *key_type, "keys", heads, rows, d.head_dim, kMaxInputMagnitude, d.keys.data(),
                              c.head_begin(), d.tokens * d.head_dim, t0 * d.head_dim);
      !s.ok()) {
    return s;
  }
  if (auto s = DecodeRowsInto(c.values(), *value_type, "values", heads, rows, d.value_dim, kMaxInputMagnitude,
                              d.values.data(), c.head_begin(), d.tokens * d.value_dim, t0 * d.value_dim);
      !s.ok()) {
    return s;
  }
  if (has_bias) {
    if (d.bias.empty()) d.bias = Zeroed(d.heads * d.tokens);  // unsent rows keep b = 0
    if (auto s = DecodeRowsInto(c.bias(), *bias_type, "bias", heads, rows, 1, kMaxBiasMagnitude, d.bias.data(),
                                c.head_begin(), d.tokens, t0);
        !s.ok()) {
      return s;
    }
  }
  return c.keys().data().size() + c.values().data().size() + (has_bias ? c.bias().data().size() : 0);
}

absl::StatusOr<uint64_t> LayerAssembler::AddQueries(const v1::QueryChunk& c) {
  auto opened = OpenLayer(c.layer());
  if (!opened.ok()) return opened.status();
  Pending& p = **opened;
  LayerData& d = p.data;
  if (absl::Status s = CheckHeads(c.head_begin(), c.head_end(), plan_->num_kv_heads); !s.ok()) return s;
  if (c.layer_queries() == 0 || c.layer_queries() > limits_->max_queries_per_layer) {
    return InvalidArgumentError(StrCat("layer_queries ", c.layer_queries(), " is not within [1, ",
                                       limits_->max_queries_per_layer, "] (max_queries_per_layer)"));
  }
  if (d.queries == 0) {
    const int64_t n = static_cast<int64_t>(c.layer_queries());
    // Before T is known only the query buffers; the working set follows with the first K/V chunk.
    const uint64_t need = d.tokens > 0 ? LayerQueryBytes(d.heads, d.tokens, n, d.head_dim, d.value_dim, threads_)
                                       : static_cast<uint64_t>(d.heads * n) * (4 * d.head_dim + 1);
    if (absl::Status s = Reserve(p, need, StrCat(n, " queries")); !s.ok()) return s;
    d.queries = n;
    d.query_data = ForOverwrite(d.heads * d.queries * d.head_dim);
    p.query_seen.assign(d.heads * d.queries, 0);
  } else if (d.queries != static_cast<int64_t>(c.layer_queries())) {
    return InvalidArgumentError(StrCat("layer_queries ", c.layer_queries(), " differs from ", d.queries,
                                       " in an earlier chunk of this layer"));
  }
  const int64_t heads = c.head_end() - c.head_begin();
  const int64_t rows = c.queries().shape_size() == 3 ? c.queries().shape(1) : -1;
  if (rows <= 0) {
    return InvalidArgumentError(StrCat("queries: shape ", ShapeString(c.queries()), ", expected [heads, rows, head_dim]"));
  }
  if (!RowsWithin(c.query_begin(), rows, d.queries)) {
    return InvalidArgumentError(StrCat("queries [", c.query_begin(), ", ", c.query_begin(), " + ", rows,
                                       ") are not within layer_queries ", d.queries));
  }
  auto query_type = CheckTensor(c.queries(), "queries", {heads, rows, d.head_dim});
  if (!query_type.ok()) return query_type.status();
  NoteWireDType(p.wire, *query_type);
  if (auto s = MarkRows(p.query_seen, d.queries, c.head_begin(), c.head_end(), c.query_begin(), rows, "query");
      !s.ok()) {
    return s;
  }
  if (auto s = DecodeRowsInto(c.queries(), *query_type, "queries", heads, rows, d.head_dim, kMaxInputMagnitude,
                              d.query_data.data(), c.head_begin(), d.queries * d.head_dim,
                              static_cast<int64_t>(c.query_begin()) * d.head_dim);
      !s.ok()) {
    return s;
  }
  return c.queries().data().size();
}

absl::StatusOr<LayerJob> LayerAssembler::EndLayer(uint32_t layer, MemoryReservation* memory) {
  if (layer >= plan_->num_layers) {
    return InvalidArgumentError(StrCat("layer ", layer, " is not within [0, ", plan_->num_layers, ")"));
  }
  auto it = open_.find(layer);
  if (it == open_.end()) return InvalidArgumentError("layer_end for a layer with no keys or values");
  Pending& p = it->second;
  if (p.data.tokens == 0) return InvalidArgumentError("no keys or values were sent for this layer");
  if (std::find(p.kv_seen.begin(), p.kv_seen.end(), 0) != p.kv_seen.end()) {
    return InvalidArgumentError(StrCat("keys/values missing: ", FirstGap(p.kv_seen, p.data.tokens)));
  }
  const MethodSpec& spec = GetMethodSpec(plan_->options.method);
  if (p.data.queries == 0 && spec.needs_queries) {
    return InvalidArgumentError(StrCat("no reference queries were sent; method ", std::string(spec.name),
                                       " needs them"));
  }
  if (p.data.queries > 0 && std::find(p.query_seen.begin(), p.query_seen.end(), 0) != p.query_seen.end()) {
    return InvalidArgumentError(StrCat("queries missing: ", FirstGap(p.query_seen, p.data.queries)));
  }
  if (plan_->cross_layer()) {
    if (first_tokens_ == 0) first_tokens_ = p.data.tokens;
    if (p.data.tokens != first_tokens_) {
      return InvalidArgumentError(StrCat("this budget allocation spans all layers and needs every layer to have the same T; ",
                                         "this layer has ", p.data.tokens, ", an earlier one ", first_tokens_));
    }
  }
  LayerJob job;
  job.options = plan_->options;
  absl::StatusOr<std::vector<int64_t>> budgets = plan_->LayerBudgets(layer, p.data.tokens);
  if (!budgets.ok()) return budgets.status();
  job.budgets = *std::move(budgets);
  // The method's working memory (OMP pools, sensitivity copies, chunk copies) joins the layer's
  // reservation before the layer is queued.
  const LayerData& d = p.data;
  job.data = LayerData{d.layer, d.heads, d.tokens, d.queries, d.head_dim, d.value_dim, d.scale, {}, {}, {}, {}};
  const uint64_t method_bytes = LayerMethodBytes(job, plan_->layer_rule, plan_->chunk_tokens, threads_);
  if (method_bytes > 0) {
    if (absl::Status s = Reserve(p, method_bytes, "its method's working memory"); !s.ok()) return s;
  }
  job.data = std::move(p.data);
  job.data.inputs_dtype = p.wire.value_or(DType::kFloat32);
  if (memory != nullptr) *memory = std::move(p.memory);
  open_.erase(it);
  ended_.insert(layer);
  return job;
}

}  // namespace kvcompact::server
