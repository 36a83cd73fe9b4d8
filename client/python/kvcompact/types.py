"""Inputs and results of a compaction, as numpy arrays."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass
class Layer:
    """One layer's cache block. Arrays are [kv_heads, T, dim] (queries [kv_heads, n, head_dim],
    pooled over the query heads of each KV head, post-RoPE; bias [kv_heads, T]). numpy arrays of
    float32/float16 (or bfloat16 from ml_dtypes), or torch tensors of float32/float16/bfloat16."""

    index: int
    keys: Any
    values: Any
    queries: Any = None
    bias: Any = None


@dataclass
class CompactedHead:
    keys: np.ndarray          # [t, head_dim]
    beta: np.ndarray          # [t] float32
    values: np.ndarray        # [t, value_dim]
    indices: np.ndarray       # [t] int64 kept positions (empty unless requested)
    tokens_in: int = 0
    output_rel_error: Optional[float] = None   # held-out queries; None when the layer had no queries
    mass_rel_error: Optional[float] = None


@dataclass
class CompactedLayer:
    index: int
    heads: list[CompactedHead]
    seconds: float = 0.0      # worker time for the layer
    device_bytes: int = 0     # device memory the server's backend held after it (0: CPU backend)


@dataclass
class CompactResult:
    layers: dict[int, CompactedLayer] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)   # layer -> message, for failed layers
    summary: Any = None                                     # kvcompact.v1.StreamSummary
