"""KV cache whose blocks may be compacted: per (layer, KV head) a list of entries with keys,
values and a logit bias (0 for plain tokens, beta for compacted ones). Lengths are ragged across
heads; new tokens take logical positions that continue from the original context length."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class HeadBlock:
    keys: np.ndarray    # [m, head_dim], post-RoPE
    values: np.ndarray  # [m, head_dim]
    bias: np.ndarray    # [m]

    @staticmethod
    def empty(d: int) -> "HeadBlock":
        z = np.zeros((0, d), np.float32)
        return HeadBlock(z, z.copy(), np.zeros(0, np.float32))

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        self.keys = np.concatenate([self.keys, k])
        self.values = np.concatenate([self.values, v])
        self.bias = np.concatenate([self.bias, np.zeros(len(k), np.float32)])

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class KVCache:
    heads: list[list[HeadBlock]]   # [layer][kv_head]
    position: int = 0               # logical position of the next token
    physical_tokens: list[int] = field(default_factory=list)

    @staticmethod
    def empty(num_layers: int, num_kv_heads: int, head_dim: int) -> "KVCache":
        return KVCache([[HeadBlock.empty(head_dim) for _ in range(num_kv_heads)] for _ in range(num_layers)])

    def entries(self) -> int:
        """Stored entries over all layers and heads (the real memory, ragged)."""
        return sum(len(h) for layer in self.heads for h in layer)

    def replace(self, layer: int, head: int, start: int, end: int, keys, values, beta) -> None:
        """Replaces entries [start, end) of one head by a compacted block (keys, values, beta)."""
        b = self.heads[layer][head]
        self.heads[layer][head] = HeadBlock(
            np.concatenate([b.keys[:start], np.asarray(keys, np.float32), b.keys[end:]]),
            np.concatenate([b.values[:start], np.asarray(values, np.float32), b.values[end:]]),
            np.concatenate([b.bias[:start], np.asarray(beta, np.float32), b.bias[end:]]))

    def copy(self) -> "KVCache":
        return KVCache([[HeadBlock(h.keys.copy(), h.values.copy(), h.bias.copy()) for h in layer] for layer in self.heads],
                       self.position)
