"""Blocks compacted elsewhere (numpy, e.g. kvcompact.runtime's cache) into a transformers model,
and teacher-forced log-probabilities through it: the bridge that checks both runtimes agree."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kvcompact.hf.attention import enable
from kvcompact.hf.cache import CompactedCache
from kvcompact.hf.capture import cache_kwarg


def from_runtime_blocks(blocks: Sequence[Sequence[tuple]], logical_length: int, device="cpu",
                        dtype=torch.float32, interleaved_rope: bool = False) -> CompactedCache:
    """blocks[layer][kv_head] = (keys [t, d], values [t, dv], beta [t]) as numpy arrays, every layer
    compacted; t may differ between heads. interleaved_rope: keys from an engine that rotates
    adjacent pairs (2i, 2i+1), as kvcompact.runtime and llama.cpp do on GGUF weights; transformers
    un-permutes those weights and rotates (i, i + d/2), so the key dimensions are reordered."""
    compacted = {}
    for l, heads in enumerate(blocks):
        out = []
        for k, v, b in heads:
            if interleaved_rope:
                k = np.concatenate([k[:, 0::2], k[:, 1::2]], axis=1)
            out.append((torch.from_numpy(np.ascontiguousarray(k, np.float32)).to(device, dtype),
                        torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(device, dtype),
                        torch.from_numpy(np.ascontiguousarray(b, np.float32)).to(device)))
        compacted[l] = out
    return CompactedCache.from_layers(compacted, {}, len(blocks), logical_length)


@torch.no_grad()
def log_probs(model, cache, token_ids: Sequence[int]) -> np.ndarray:
    """log p(token_ids[i] | cache, token_ids[:i]) for i >= 1 (float64); appends the tokens to `cache`."""
    enable(model)
    device = model.get_input_embeddings().weight.device
    ids = torch.as_tensor(list(token_ids), device=device)[None]
    logits = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits[0, :-1].double()
    logp = torch.log_softmax(logits, dim=-1)
    target = ids[0, 1:]
    return logp[torch.arange(len(target), device=device), target].cpu().numpy()
