"""Compacting a runtime's KV cache through the service: send a span of every (layer, KV head),
put the compacted blocks (keys, beta, values) in its place. Positions of later tokens stay logical."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from kvcompact.client import Client, protected_plan
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
                  layers: Optional[Sequence[int]] = None, protected: Optional[Sequence[int]] = None,
                  **options) -> CompactResult:
    """Compacts entries [start, end) of every head of `layers` (default: all; models with sliding
    windows pass their compactable_layers()) in place; returns the service result, whose layer i
    is layers[i]. `protected` (positions in [start, end)) stay exact, with their bias, and count against
    the budget: the service compacts the rest of the span to `ratio`'s (or `tokens`', or each of
    `per_head`'s) total less their number, split across heads by `allocation` if given (compacted
    blocks compose, so exact entries beside a compacted block change nothing in its fit)."""
    chosen = list(range(len(cache.heads))) if layers is None else list(layers)
    if protected is None or len(protected) == 0:
        result = client.compact(cache_layers(cache, queries, start, end, chosen), **options)
        exact = None
    else:
        per_head = options.pop("per_head", None)
        if per_head is not None:  # each head's own total, the protected included; the smallest must leave some
            rest, exact, _ = protected_plan(start, end, protected, tokens=min(per_head))
            budget = {"per_head": [int(t) - int(exact.size) for t in per_head]}
        else:
            rest, exact, left = protected_plan(start, end, protected, options.pop("ratio", None), options.pop("tokens", None))
            budget = {"tokens": left}  # with an allocation rule, its mean per head
        result = client.compact(_gathered_layers(cache, queries, rest, chosen), **budget, **options)
    if result.errors:
        raise RuntimeError(f"compaction failed for layers {sorted(result.errors)}: {next(iter(result.errors.values()))}")
    for i, layer in result.layers.items():
        for g, head in enumerate(layer.heads):
            keys, values, beta = head.keys, head.values, head.beta
            if exact is not None:
                h = cache.heads[chosen[i]][g]
                keys = np.concatenate([np.asarray(keys, np.float32), h.keys[exact]])
                values = np.concatenate([np.asarray(values, np.float32), h.values[exact]])
                beta = np.concatenate([np.asarray(beta, np.float32), h.bias[exact]])  # 0 unless compacted before
            cache.replace(chosen[i], g, start, end, keys, values, beta)
    return result


def _gathered_layers(cache: KVCache, queries, positions: np.ndarray, chosen: Sequence[int]) -> list[Layer]:
    """The entries at `positions` of every head of the chosen layers, with their bias if any."""
    out = []
    for i, l in enumerate(chosen):
        heads = cache.heads[l]
        bias = np.stack([h.bias[positions] for h in heads])
        out.append(Layer(i, np.stack([h.keys[positions] for h in heads]), np.stack([h.values[positions] for h in heads]),
                         None if queries is None else queries[l], bias if np.any(bias) else None))
    return out
