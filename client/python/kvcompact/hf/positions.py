"""Physical instead of logical positions: re-rotating compacted RoPE keys.

An engine that cannot start new tokens at the original length T (its positions follow the number
of stored entries) can still use a compacted cache: RoPE turns a key at position p by the angles
p * theta_i, so turning every compacted key back by delta = T - P (P entries stored) puts it where
the engine's new tokens at P, P + 1, ... see it at the distance the uncompacted model would have
seen: (P + i) - (p - delta) = T + i - p. Exact for RoPE whose frequencies do not depend on the
position (default, linear, llama3, YaRN); not for dynamic NTK scaling. The bias beta is unchanged.
"""
from __future__ import annotations

import torch

from kvcompact.hf.cache import CompactedCache, CompactedLayer


def _rotary(model):
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or getattr(model.config, "layer_types", None) and "sliding_attention" in model.config.layer_types:
        raise NotImplementedError("re-rotation is implemented for models with one rotary embedding (Llama, Qwen, Mistral)")
    return rotary


def rerotate_keys(model, keys: torch.Tensor, delta: int) -> torch.Tensor:
    """Post-RoPE keys [..., n, d] (transformers' half-split layout) moved back by `delta` positions."""
    rotary = _rotary(model)
    pos = torch.full((1, 1), -int(delta), dtype=torch.long, device=keys.device)
    cos, sin = rotary(keys.float(), pos)
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)  # cos/sin come scaled by it
    cos, sin = cos[0, 0] / scale, sin[0, 0] / scale
    k = keys.float()
    half = k.shape[-1] // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * cos + rotated * sin).to(keys.dtype)


def with_physical_positions(model, cache: CompactedCache) -> CompactedCache:
    """The same batch-1 cache (nothing appended) with keys re-rotated so that new tokens take the
    positions P, P + 1, ... of the entries stored, instead of the original length T."""
    if len(cache.logical_lengths) != 1 or any(isinstance(l, CompactedLayer) and l.appended() for l in cache.layers):
        raise ValueError("with_physical_positions takes a batch-1 cache before any token is appended")
    layers = []
    physical = None
    for layer in cache.layers:
        if not isinstance(layer, CompactedLayer):
            raise NotImplementedError("every layer must be compacted (no exact sliding-window layers)")
        physical = layer.compacted if physical is None else physical
        if layer.compacted != physical:
            raise ValueError("layers hold different numbers of entries; pad them to one length first")
        delta = layer.logical_length - physical
        layers.append(CompactedLayer(rerotate_keys(model, layer.keys, delta), layer.values, layer.bias, physical))
    return CompactedCache(layers, [physical])
