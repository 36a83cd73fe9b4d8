"""A transformers cache whose full-attention layers hold compacted blocks (keys, values, beta).

`CompactedCache` is a transformers `Cache`, so `model.generate(past_key_values=cache, ...)` and
plain forward calls use it like any other. Per compacted layer it keeps keys and values
[batch, kv_heads, P + A, d] and a bias [batch, kv_heads, P + A]: beta for the P compacted entries
(ragged heads and shorter batch rows padded with the dtype's minimum, weight 0 after the softmax),
0 for the A tokens appended since. Sliding-window layers (Gemma 3) are the model's own exact layers.

Positions stay logical: the cache reports the original context length (plus what was appended)
as its sequence length, so new tokens are rotated at the positions the uncompacted model would use.
With batch > 1 the rows' context lengths differ; the 2D attention mask of `generate_inputs`
left-pads every row to the longest, so transformers derives each row's positions from it.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvcompact.hf.attention import query_head_bias


def _neg(dtype) -> float:
    return torch.finfo(dtype).min


class CompactedLayer(DynamicLayer):
    """One full-attention layer: P compacted entries per head (padded), then appended tokens."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, logical_length: int):
        super().__init__()
        if keys.shape[:3] != bias.shape or values.shape[:3] != bias.shape:
            raise ValueError(f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and bias {tuple(bias.shape)} "
                             "must agree in [batch, kv_heads, entries]")
        self.keys, self.values, self.bias = keys, values, bias
        self.device, self.is_initialized = keys.device, True
        self.compacted = int(keys.shape[2])
        self.logical_length = int(logical_length)
        self._head_bias = None  # bias per query head in the query dtype, built at the first attention

    def lazy_initialization(self, key_states, value_states) -> None:  # built initialised
        pass

    def _tagged(self) -> torch.Tensor:
        keys = self.keys
        keys._kvcompact_layer = self  # read by the "kvcompact" attention
        return keys

    def update(self, key_states, value_states, *args, **kwargs):
        b, h, n = key_states.shape[:3]
        self.keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.values.dtype)], dim=-2)
        self.bias = torch.cat([self.bias, self.bias.new_zeros(b, h, n)], dim=-1)
        if self._head_bias is not None:  # appended entries: bias 0 (one cat per step, not a rebuild)
            hb = self._head_bias
            self._head_bias = torch.cat([hb, hb.new_zeros(hb.shape[0], hb.shape[1], 1, n)], dim=-1)
        return self._tagged(), self.values

    def head_bias(self, group: int, dtype) -> torch.Tensor:
        """The bias per query head [batch, query_heads, 1, keys] in `dtype`, kept between steps."""
        hb = self._head_bias
        if hb is None or hb.dtype != dtype or hb.shape[1] != self.bias.shape[1] * group or hb.shape[-1] != self.bias.shape[-1]:
            self._head_bias = hb = query_head_bias(self.bias, group, dtype)
        return hb

    def appended(self) -> int:
        return int(self.keys.shape[2]) - self.compacted

    def get_seq_length(self) -> int:
        return self.logical_length + self.appended()

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        return self.get_seq_length() + int(query_length if isinstance(query_length, int) else query_length.shape[0]), 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Removes appended tokens (never compacted entries): `crop(-k)` drops the last k."""
        if tokens_to_remove > 0:
            tokens_to_remove = self.get_seq_length() - tokens_to_remove
        k = abs(tokens_to_remove)
        if k > self.appended():
            raise ValueError(f"cannot crop {k} tokens: only {self.appended()} were appended after compaction")
        if k:
            self.keys, self.values, self.bias = self.keys[..., :-k, :], self.values[..., :-k, :], self.bias[..., :-k]
            self._head_bias = None

    def reset(self) -> None:
        raise NotImplementedError("a compacted layer cannot be reset; build a new cache")

    def offload(self):
        raise NotImplementedError("offloading a compacted cache is not supported")

    def _rows(self, op) -> None:
        self.keys, self.values, self.bias = op(self.keys), op(self.values), op(self.bias)
        self._head_bias = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))


def pad_heads(heads: Sequence[tuple], dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(keys [t_h, d], values [t_h, dv], bias [t_h])] -> keys, values [1, H, t_max, .], bias [1, H, t_max]."""
    t_max = max(int(k.shape[0]) for k, _, _ in heads)
    d, dv = int(heads[0][0].shape[1]), int(heads[0][1].shape[1])
    keys = torch.zeros(1, len(heads), t_max, d, dtype=dtype, device=device)
    values = torch.zeros(1, len(heads), t_max, dv, dtype=dtype, device=device)
    bias = torch.full((1, len(heads), t_max), _neg(torch.float32), dtype=torch.float32, device=device)
    for g, (k, v, b) in enumerate(heads):
        t = int(k.shape[0])
        keys[0, g, :t] = torch.as_tensor(k).to(device=device, dtype=dtype)
        values[0, g, :t] = torch.as_tensor(v).to(device=device, dtype=dtype)
        bias[0, g, :t] = torch.as_tensor(b).to(device=device, dtype=torch.float32)
    return keys, values, bias


class CompactedCache(Cache):
    """Layers: `CompactedLayer` for compacted full-attention layers, the model's own (exact) layers
    elsewhere. `logical_lengths[b]` is row b's original context length."""

    def __init__(self, layers: list, logical_lengths: Sequence[int]):
        super().__init__(layers=layers)
        self.logical_lengths = [int(x) for x in logical_lengths]

    @staticmethod
    def from_layers(compacted: dict, exact: dict, num_layers: int, logical_length: int) -> "CompactedCache":
        """Batch 1: `compacted[l]` = per-head (keys, values, bias) of layer l (ragged), `exact[l]` a
        layer object kept as it is (e.g. the prefill's sliding-window layer)."""
        layers = []
        for l in range(num_layers):
            if l in compacted:
                k0 = compacted[l][0][0]
                dtype, device = (k0.dtype, k0.device) if isinstance(k0, torch.Tensor) else (torch.float32, "cpu")
                layers.append(CompactedLayer(*pad_heads(compacted[l], dtype, device), logical_length))
            else:
                layers.append(exact[l])
        return CompactedCache(layers, [logical_length])

    def copy(self) -> "CompactedCache":
        """An independent cache to generate from (tensors are shared, not copied: every update
        rebinds them, so generating from the copy leaves this one as it is)."""
        return CompactedCache([copy.copy(layer) for layer in self.layers], self.logical_lengths)

    @staticmethod
    def stack(caches: Sequence["CompactedCache"]) -> "CompactedCache":
        """One batch from batch-1 caches of different contexts: each compacted layer's entries (and
        tokens appended so far, bias 0) padded to the longest row, exact sliding layers left-padded
        (the attention mask of `generate_inputs` hides the padding). Rows continue at their own
        lengths; give them one-token prompts (`kvcompact.hf.batch_inputs` runs longer prompts
        into each row first) so that no padding sits between a row's tokens, which would narrow
        a sliding window."""
        if any(len(c.logical_lengths) != 1 for c in caches):
            raise ValueError("stack() takes batch-1 caches")
        lengths = [c.row_lengths()[0] for c in caches]
        longest = max(lengths)
        pad = torch.nn.functional.pad
        layers = []
        for l in range(len(caches[0].layers)):
            parts = [c.layers[l] for c in caches]
            if isinstance(parts[0], CompactedLayer):
                t = max(p.keys.shape[2] for p in parts)
                keys = torch.cat([pad(p.keys, (0, 0, 0, t - p.keys.shape[2])) for p in parts])
                values = torch.cat([pad(p.values, (0, 0, 0, t - p.values.shape[2])) for p in parts])
                bias = torch.cat([pad(p.bias, (0, t - p.bias.shape[2]), value=_neg(p.bias.dtype)) for p in parts])
                layers.append(CompactedLayer(keys, values, bias, longest))
            elif isinstance(parts[0], DynamicSlidingWindowLayer):
                t = max(p.keys.shape[2] for p in parts)
                layer = copy.copy(parts[0])
                layer.keys = torch.cat([pad(p.keys, (0, 0, t - p.keys.shape[2], 0)) for p in parts])
                layer.values = torch.cat([pad(p.values, (0, 0, t - p.values.shape[2], 0)) for p in parts])
                layer.cumulative_length = longest
                layers.append(layer)
            else:
                raise ValueError(f"layer {l}: cannot stack a {type(parts[0]).__name__}")
        return CompactedCache(layers, lengths)

    def row_lengths(self) -> list[int]:
        """Each row's length now: its context's logical length plus the tokens appended since."""
        grown = self.get_seq_length() - max(self.logical_lengths)
        return [length + grown for length in self.logical_lengths]

    def generate_inputs(self, prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> dict:
        """`input_ids` and `attention_mask` for `model.generate(past_key_values=self, **inputs)`:
        per row, placeholders for the (already cached) context, then the row's prompt tokens,
        left-padded to a common length; the mask marks each row's own context length and prompt."""
        if len(prompts) != len(self.logical_lengths):
            raise ValueError(f"{len(prompts)} prompts for a cache of batch {len(self.logical_lengths)}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every row needs at least one prompt token")
        lengths = self.row_lengths()
        longest, width = max(lengths), max(len(p) for p in prompts)
        device = next(layer.keys.device for layer in self.layers if layer.keys is not None)
        ids = torch.full((len(prompts), longest + width), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for b, (length, prompt) in enumerate(zip(lengths, prompts)):
            mask[b, longest - length:longest] = 1
            ids[b, longest + width - len(prompt):] = torch.as_tensor(list(prompt), device=device)
            mask[b, longest + width - len(prompt):] = 1
        return {"input_ids": ids, "attention_mask": mask}



def cache_nbytes(cache) -> int:
    """Bytes of keys, values and (compacted layers) biases in any transformers cache."""
    tensors = (getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values", "bias"))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
