// Chunked compaction: a long block split into contiguous chunks compacted independently. Correct
// by the composition argument of the spec (section 1): a compacted block that matches the mass and
// output of its own tokens behaves the same inside any larger context, so the compacted chunks,
// concatenated, stand in for the whole block.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "core/budget.h"
#include "core/layer.h"

namespace kvcompact {

// Chunk boundaries of T tokens for chunks of at most `chunk_tokens` (balanced lengths).
std::vector<int64_t> ChunkBounds(int64_t tokens, int64_t chunk_tokens);

// Compacts every head of `job` in chunks of at most `chunk_tokens` tokens through `backend`. Each
// head's t is split over its chunks in proportion to their lengths; a per-layer rule (global
// top-k, sensitivity) then splits each chunk's total across the heads. Results are per whole head
// (indices into the whole block); quality figures are those of the concatenated block against the
// whole block on up to kChunkedEvalQueries held-out queries per head (the same held-out split in
// every chunk: no chunk fits to them); the fit error is the chunks' own, averaged.
absl::StatusOr<LayerResult> CompactLayerInChunks(Backend& backend, const LayerJob& job, int64_t chunk_tokens,
                                                 const LayerAllocation& rule);

inline constexpr int64_t kChunkedEvalQueries = 256;

}  // namespace kvcompact
