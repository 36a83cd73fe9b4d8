// The on-disk layout of caches the CLI reads and writes.
//
// Input: one .safetensors file, or a directory of .npy files, holding per layer L
//   layers.L.keys     [kv_heads, T, head_dim]   post-RoPE keys            (F32, F16, BF16)
//   layers.L.values   [kv_heads, T, value_dim]
//   layers.L.queries  [kv_heads, n, head_dim]   reference queries, pooled per KV head (optional
//                                               for the query-free methods)
//   layers.L.bias     [kv_heads, T]             optional: beta of an earlier compaction
// safetensors metadata (optional): logit_scale, query_heads_per_kv_head.
//
// Output (.safetensors), ragged per head, per layer L and KV head h:
//   layers.L.heads.h.keys [t_h, head_dim], .beta [t_h] (F32), .values [t_h, value_dim],
//   .indices [t_h] (I32, when requested)
// metadata: format=kvcompact.compacted.v1, method, logit_scale, num_layers, num_kv_heads,
//   layers.L.tokens_in (the original T: new tokens continue at this logical position).
//
// Packed output (--layout=packed, format=kvcompact.compacted.packed.v1): per layer L the heads'
// rows back to back, with CSR offsets, as varlen attention kernels take them (each (layer, KV
// head) is one "sequence", cu_seqlens = offsets):
//   layers.L.keys [sum_h t_h, head_dim], .values [sum_h t_h, value_dim], .beta [sum_h t_h] (F32),
//   .offsets [kv_heads + 1] (I32; head h is rows offsets[h] .. offsets[h+1]), .indices (I32, optional)
// Nothing is padded in either layout: bytes follow sum_h t_h, not kv_heads x max_h t_h.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "client/safetensors.h"

namespace kvcompact::client {

struct CacheInput {
  uint32_t num_layers = 0, num_kv_heads = 0, head_dim = 0, value_dim = 0, query_heads_per_kv_head = 0;
  float logit_scale = 0;  // 0: not given (server uses 1/sqrt(d))
  std::vector<LayerInput> layers;
};

absl::StatusOr<CacheInput> LoadCache(const std::string& path);
// The layers of an already read file (`path` is for messages); LoadCache's second half.
absl::StatusOr<CacheInput> CacheFromTensors(TensorFile file, const std::string& path);

struct CompactedFileInfo {
  std::string method;
  float logit_scale = 0;
  uint32_t num_layers = 0, num_kv_heads = 0, head_dim = 0, value_dim = 0;
  std::vector<uint64_t> tokens_in;  // per layer (0 where the layer was not compacted)
  bool packed = false;              // the packed layout above
};

// Bytes of the compacted blocks themselves: sum over heads of t_h x (keys + values in their dtype
// + 4 for beta). The nominal size of a budget; files add only their header (and indices).
uint64_t CompactedPayloadBytes(const CompactOutcome& outcome);
absl::Status SaveCompacted(const std::string& path, const CompactOutcome& outcome, const CompactedFileInfo& info);

// Writes an input cache (used by `kvcompact generate` and the tests).
absl::Status SaveCache(const std::string& path, const CacheInput& cache);

}  // namespace kvcompact::client
