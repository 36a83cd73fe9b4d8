"""Running a compacted cache inside an HF transformers model (torch; Llama-family attention).

    from kvcompact.hf import CompactedCache, enable, forward
    enable(model)                                   # registers and selects the "kvcompact" attention
    cache = CompactedCache.from_blocks(blocks, logical_length=T)   # or CompactedCache.empty(model)
    logits = forward(model, cache, token_ids)       # appends the tokens; positions continue at T

The cache holds, per layer, keys, values and a per-key bias beta for every KV head. Heads may hold
different numbers of entries (ragged budgets): shorter heads are padded with beta = -inf, which the
softmax gives weight exactly 0 (the padding costs memory here; the service's results stay ragged).
New tokens get beta = 0 and continue at the logical position (original length, not the physical
one), so their RoPE phases match what the uncompacted model would have used.

The "kvcompact" attention computes softmax(s q K^T + beta + causal) V, beta per KV head shared by
its query heads, in fp32. `forward` passes a ready 4D mask so that transformers does not build one
from the cache's physical length; HF `generate()` is not supported (use `forward` in a loop).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

ATTENTION_NAME = "kvcompact"


def _torch():
    import torch

    return torch


class CompactedCache:
    """A per-layer cache of (keys, values, beta) for batch size 1, in the shapes transformers'
    attention modules use: keys/values [1, kv_heads, T, d], beta [kv_heads, T]."""

    def __init__(self, keys: list, values: list, beta: list, logical_length: int):
        self.keys, self.values, self.beta = keys, values, beta
        self.logical_length = logical_length

    @staticmethod
    def from_blocks(blocks: Sequence[Sequence[tuple]], logical_length: int, device="cpu",
                    interleaved_rope: bool = False) -> "CompactedCache":
        """blocks[layer][kv_head] = (keys [t, d], values [t, dv], beta [t]) as numpy arrays; t may
        differ between heads. interleaved_rope: the keys come from an engine that rotates adjacent
        pairs (2i, 2i+1), as kvcompact.runtime and llama.cpp do on GGUF weights; transformers
        un-permutes those weights and rotates (i, i + d/2), so the key dimensions are reordered
        to match (values and beta are unaffected; the service itself is layout-agnostic)."""
        torch = _torch()
        keys, values, beta = [], [], []
        for heads in blocks:
            t_max = max(len(b[2]) for b in heads)
            d, dv = heads[0][0].shape[1], heads[0][1].shape[1]
            k = np.zeros((len(heads), t_max, d), np.float32)
            v = np.zeros((len(heads), t_max, dv), np.float32)
            b = np.full((len(heads), t_max), -np.inf, np.float32)
            for g, (hk, hv, hb) in enumerate(heads):
                t = len(hb)
                if interleaved_rope:
                    hk = np.concatenate([hk[:, 0::2], hk[:, 1::2]], axis=1)
                k[g, :t], v[g, :t], b[g, :t] = hk, hv, hb
            keys.append(torch.from_numpy(k)[None].to(device))
            values.append(torch.from_numpy(v)[None].to(device))
            beta.append(torch.from_numpy(b).to(device))
        return CompactedCache(keys, values, beta, logical_length)

    @staticmethod
    def empty(model, device="cpu") -> "CompactedCache":
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        empty_head = (np.zeros((0, head_dim), np.float32), np.zeros((0, head_dim), np.float32), np.zeros(0, np.float32))
        return CompactedCache.from_blocks([[empty_head] * c.num_key_value_heads] * c.num_hidden_layers, 0, device)

    def physical_length(self, layer: int = 0) -> int:
        return int(self.keys[layer].shape[2])

    # The transformers cache protocol, as far as the attention modules use it.
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        torch = _torch()
        n = key_states.shape[2]
        self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states.float()], dim=2)
        self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states.float()], dim=2)
        zeros = torch.zeros(self.beta[layer_idx].shape[0], n, dtype=torch.float32, device=key_states.device)
        self.beta[layer_idx] = torch.cat([self.beta[layer_idx], zeros], dim=1)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.logical_length


def kvcompact_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                        kvcompact_cache: CompactedCache | None = None, **kwargs):
    """softmax(s q K^T + beta + causal) V for query [1, Hq, n, d] against key/value [1, Hkv, T, d]
    (the cache's entries followed by the n new tokens). Returns ([1, n, Hq, dv], None)."""
    torch = _torch()
    if kvcompact_cache is None:
        raise ValueError("the kvcompact attention needs kvcompact_cache=... in the model call (see kvcompact.hf.forward)")
    hq, hkv, n, total = query.shape[1], key.shape[1], query.shape[2], key.shape[2]
    group = hq // hkv
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    beta = kvcompact_cache.beta[module.layer_idx].repeat_interleave(group, dim=0)  # [Hq, T]
    logits = torch.matmul(query.float(), k.transpose(2, 3)) * scaling + beta[None, :, None, :]
    # New token i sees every cached entry and the new tokens up to itself.
    past = total - n
    allowed = torch.arange(total, device=query.device)[None, :] <= (past + torch.arange(n, device=query.device))[:, None]
    logits = logits.masked_fill(~allowed[None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out.to(query.dtype), None


def enable(model) -> None:
    """Registers the attention function and selects it for `model`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, kvcompact_attention)
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except Exception:  # older versions: set it on the config directly
        model.config._attn_implementation = ATTENTION_NAME


def forward(model, cache: CompactedCache, token_ids: Sequence[int]):
    """Appends `token_ids` to `cache` and returns their logits [n, vocab] (fp32, on the model's device)."""
    torch = _torch()
    device = cache.keys[0].device
    n = len(token_ids)
    ids = torch.tensor([list(token_ids)], device=device)
    positions = (cache.logical_length + torch.arange(n, device=device))[None]
    # A ready 4D mask makes transformers skip building one from the cache; the attention ignores it.
    mask = torch.zeros(1, 1, n, cache.physical_length() + n, device=device)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache, use_cache=True,
                    kvcompact_cache=cache)
    cache.logical_length += n
    return out.logits[0].float()


def log_probs(model, cache: CompactedCache, token_ids: Sequence[int]) -> np.ndarray:
    """Teacher-forced log p(token_ids[i] | cache, token_ids[:i]) for i >= 1; appends to the cache
    (the same quantity as kvcompact.runtime's LlamaModel.log_probs)."""
    torch = _torch()
    logits = forward(model, cache, token_ids)[:-1].double()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(list(token_ids[1:]), device=logp.device)
    return logp[torch.arange(len(target), device=logp.device), target].cpu().numpy()
