"""Reference queries from the HF model itself: post-RoPE queries pooled per KV head.

The "kvcompact" attention records the queries it is called with while a `QueryCapture` is active,
in the model's dtype on its device, shaped per layer [kv_heads, group * m, d] (the query heads of a
GQA group stacked) as `kvcompact.Layer.queries` takes them. Sources, as in kvcompact.runtime:

- context-prefill: the context's own queries, recorded during its prefill (free);
- repeat-prefill: an instruction to repeat the context, then the context teacher-forced after it
  (one extra prefill): queries of tokens that look back at the whole context;
- repeat-detail: of the same pass, the queries before the context's least predictable tokens
  (numbers, names, rare words: the ones that must be copied from the cache), counted again;
- self-study: the model's own greedy answers to prompts about the context (slowest);
- detail-questions: questions about the context's least predictable named numbers and the
  model's answers (kvcompact.client.detail_questions), prompts and answers both captured.

Only `positions` (indices into the captured token stream) are kept, so a 32k-token context does
not hold 32k queries per head; the caches passed in are never modified.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Optional, Sequence

import torch
from transformers import DynamicCache

from kvcompact.hf.attention import active_capture, enable, set_capture


class QueryCapture:
    """Records queries of `layers` at token `positions` (None: all) of the stream it sees; with
    `decode_only`, only single-token calls (the generated tokens of `generate`)."""

    def __init__(self, layers: Sequence[int], positions: Optional[torch.Tensor] = None, decode_only: bool = False):
        self.layers = set(layers)
        self.positions = positions
        self.decode_only = decode_only
        self.seen = {l: 0 for l in self.layers}
        self.parts: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}

    def add(self, layer: int, query: torch.Tensor) -> None:
        if layer not in self.layers:
            return
        if query.shape[0] != 1:
            raise ValueError("query capture runs on batch-1 passes")
        n = query.shape[2]
        start = self.seen[layer]
        self.seen[layer] += n
        if self.decode_only and n != 1:
            return
        q = query[0]
        if self.positions is not None:
            p = self.positions.to(q.device)
            idx = p[(p >= start) & (p < start + n)] - start
            if idx.numel() == 0:
                return
            q = q[:, idx]
        self.parts[layer].append(q.detach())

    def queries(self, kv_heads: int) -> dict[int, torch.Tensor]:
        """Per layer [kv_heads, group * m, d] (query-head major within each KV head)."""
        out = {}
        for l, parts in self.parts.items():
            if not parts:
                raise ValueError(f"no queries were captured for layer {l}")
            q = torch.cat(parts, dim=1)  # [Hq, m, d]
            hq, m, d = q.shape
            out[l] = q.reshape(kv_heads, (hq // kv_heads) * m, d).contiguous()
        return out

    def __enter__(self) -> "QueryCapture":
        if active_capture() is not None:
            raise RuntimeError("a query capture is already active in this thread")
        set_capture(self)
        return self

    def __exit__(self, *exc) -> None:
        set_capture(None)


def text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def compactable_layers(model) -> list[int]:
    """Full-attention layers (sliding-window layers stay exact)."""
    c = text_config(model)
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    return [l for l, t in enumerate(types) if t != "sliding_attention"]


def cache_kwarg(model) -> str:
    """The forward argument that takes the cache: `cache` from transformers 5.2x, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fork(cache):
    """An independent cache that shares tensors (updates rebind them, so the original is untouched)."""
    twin = copy.copy(cache)
    twin.layers = [copy.copy(layer) for layer in cache.layers]
    return twin


def sample_positions(count: int, keep: int, seed: int, offset: int = 0) -> Optional[torch.Tensor]:
    """`keep` random token indices of `count` (sorted), shifted by `offset`; None keeps them all."""
    if keep >= count:
        return None if offset == 0 else torch.arange(offset, offset + count)
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(count, generator=g)[:keep]).values + offset


SURPRISAL_CHUNK = 512  # tokens per forward pass when every position's logits are kept


@torch.no_grad()
def prefill(model, ids: Sequence[int], cache=None, chunk: int = 4096, capture: Optional[QueryCapture] = None,
            surprisal: Optional[list] = None):
    """Runs `ids` through the model in chunks into `cache` (a new DynamicCache by default);
    returns the cache and the last token's logits [vocab]. With a list `surprisal`, appends each
    token's -log p(token | what precedes it) (nats, fp32 on the CPU; 0 for the first token)."""
    enable(model)
    device = model.get_input_embeddings().weight.device
    cache = cache if cache is not None else DynamicCache(config=model.config)
    ids = torch.as_tensor(list(ids), device=device)[None]
    logits = None
    if surprisal is not None:
        chunk = min(chunk, SURPRISAL_CHUNK)  # bounds the chunk x vocab logits held at once
        surprisal.append(0.0)
    with capture if capture is not None else contextlib.nullcontext():
        for s in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, s:s + chunk], use_cache=True, logits_to_keep=0 if surprisal is not None else 1,
                        **{cache_kwarg(model): cache})
            logits = out.logits[0, -1]
            if surprisal is not None:
                nxt = ids[0, s + 1:s + chunk + 1]  # what each position predicts
                logp = torch.log_softmax(out.logits[0, :len(nxt)].float(), dim=-1)
                surprisal.extend((-logp.gather(1, nxt[:, None])[:, 0]).cpu().tolist())
    return cache, logits


def context_prefill(model, ids: Sequence[int], keep: int, seed: int = 0, chunk: int = 4096,
                    surprisal: Optional[list] = None):
    """Prefills the context; returns (cache, its queries at `keep` random positions per layer);
    each token's surprisal into the list `surprisal` if given (see prefill)."""
    layers = compactable_layers(model)
    cap = QueryCapture(layers, sample_positions(len(ids), keep, seed))
    cache, _ = prefill(model, ids, chunk=chunk, capture=cap, surprisal=surprisal)
    return cache, cap.queries(text_config(model).num_key_value_heads)


def repeat_prefill(model, cache, context: Sequence[int], instruction: Sequence[int], positions: torch.Tensor,
                   chunk: int = 4096) -> dict[int, torch.Tensor]:
    """Queries of `context` teacher-forced again after `instruction` (on a fork of `cache`), at
    `positions` (indices into `context`, sorted; a repeated index records its query again)."""
    cap = QueryCapture(compactable_layers(model), positions + len(instruction))
    prefill(model, list(instruction) + list(context), cache=fork(cache), chunk=chunk, capture=cap)
    return cap.queries(text_config(model).num_key_value_heads)


@torch.no_grad()
def self_study(model, cache, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               eos_token_id=None, with_prompts: bool = False) -> dict[int, torch.Tensor]:
    """Queries of the model's greedy answers to `prompts` (token ids) about the cached context
    (and of the prompts' own tokens, `with_prompts`)."""
    enable(model)
    layers = compactable_layers(model)
    cap = QueryCapture(layers, decode_only=not with_prompts)
    device = model.get_input_embeddings().weight.device
    with cap:
        for prompt in prompts:
            c = fork(cache)
            past = c.get_seq_length()
            ids = torch.cat([torch.zeros(1, past, dtype=torch.long, device=device),
                             torch.as_tensor(list(prompt), device=device)[None]], dim=1)
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id or 0,
                           **{cache_kwarg(model): c})
    return cap.queries(text_config(model).num_key_value_heads)
