"""Compacting a runtime's KV cache through the service: send a span of every (layer, KV head),
put the compacted blocks (keys, beta, values) in its place. Positions of later tokens stay logical."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from kvcompact.client import Client
from kvcompact.runtime.cache import KVCache
from kvcompact.types import CompactResult, Layer


def cache_layers(cache: KVCache, queries: Optional[Sequence[np.ndarray]], start: int, end: int,
                 layers: Optional[Sequence[int]] = None) -> list[Layer]:
    """Entries [start, end) of every head of `layers` (default: all) as service layers, numbered
    0.. in that order. Heads of a layer must hold the same span (true for a cache that was not
    compacted there before, or compacted with the same t for every head)."""
    chosen = list(range(len(cache.heads))) if layers is None else list(layers)
    out = []
    for i, l in enumerate(chosen):
        heads = cache.heads[l]
        keys = np.stack([h.keys[start:end] for h in heads])
        values = np.stack([h.values[start:end] for h in heads])
        bias = np.stack([h.bias[start:end] for h in heads])
        out.append(Layer(i, keys, values, None if queries is None else queries[l],
                         bias if np.any(bias) else None))
    return out


def compact_cache(cache: KVCache, client: Client, queries: Optional[Sequence[np.ndarray]], start: int, end: int,
                  layers: Optional[Sequence[int]] = None, **options) -> CompactResult:
    """Compacts entries [start, end) of every head of `layers` (default: all; models with sliding
    windows pass their compactable_layers()) in place; returns the service result, whose layer i
    is layers[i]."""
    chosen = list(range(len(cache.heads))) if layers is None else list(layers)
    result = client.compact(cache_layers(cache, queries, start, end, chosen), **options)
    if result.errors:
        raise RuntimeError(f"compaction failed for layers {sorted(result.errors)}: {next(iter(result.errors.values()))}")
    for i, layer in result.layers.items():
        for g, head in enumerate(layer.heads):
            cache.replace(chosen[i], g, start, end, head.keys, head.values, head.beta)
    return result
