"""The "kvcompact" attention for transformers: SDPA with the compacted cache's per-key bias.

A compacted layer's keys arrive from `CompactedLayer.update` carrying their layer (attribute
`_kvcompact_layer`), whose bias is beta for the compacted entries, the dtype's minimum for padding
of ragged heads and 0 for appended tokens, [batch, kv_heads, keys]. The bias is shared by the query heads of a
KV head and is added to the logits in the query's dtype (an fp32 mask with bf16 q/k/v gives NaN on
some SDPA backends). New tokens see every compacted entry and, among the appended entries, what
transformers' own mask lets them see (causality and padding): its last columns are the appended
tokens, whatever the cache's logical length. Layers without a bias (sliding-window layers kept
exact, ordinary caches) go to transformers' own SDPA attention unchanged.

While a `QueryCapture` is active (kvcompact.hf.capture) the function also records each layer's
post-RoPE queries: the reference queries the service fits to.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

ATTENTION_NAME = "kvcompact"
# SDPA backends for compacted layers on CUDA, in order of preference (empty: SDPA's own choice).
SDPA_BACKENDS: list = []
_local = threading.local()


def active_capture():
    return getattr(_local, "capture", None)


def set_capture(capture) -> None:
    _local.capture = capture


def _allowed_appended(attention_mask, n: int, appended: int, device) -> torch.Tensor:
    """[batch or 1, 1, n, appended] bool: which appended entries each new token may see."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-1] >= appended:
        tail = attention_mask[..., -appended:]
        if tail.dtype != torch.bool:  # an additive mask: 0 where allowed
            tail = tail > torch.finfo(tail.dtype).min / 2
        return tail[..., -n:, :]
    # No mask (transformers skips it when plain causality suffices): token i of the n new ones sits
    # at appended index appended - n + i and sees everything up to itself.
    cols = torch.arange(appended, device=device)[None, :]
    rows = (appended - n + torch.arange(n, device=device))[:, None]
    return (cols <= rows)[None, None]


def query_head_bias(bias: torch.Tensor, group: int, dtype) -> torch.Tensor:
    """[batch, kv_heads, keys] fp32 -> [batch, query_heads, 1, keys] in `dtype` (padding at its minimum)."""
    return bias.to(dtype).clamp_min(torch.finfo(dtype).min).repeat_interleave(group, dim=1)[:, :, None, :]


def biased_mask(head_bias: torch.Tensor, compacted: int, attention_mask, n: int) -> torch.Tensor:
    """The additive mask [batch, query_heads, n or 1, keys] for a compacted layer from its
    `query_head_bias`: appended entries a new token may not see (later tokens, padding) get the
    dtype's minimum. One new token that may see everything (decoding) uses the bias as it is."""
    total = head_bias.shape[-1]
    appended = total - compacted
    if appended == 0 or (n == 1 and not isinstance(attention_mask, torch.Tensor)):
        return head_bias  # no mask from transformers: no padding, and one token sees all before it
    allowed = _allowed_appended(attention_mask, n, appended, head_bias.device)
    mask = head_bias.expand(-1, -1, n, -1).clone()
    mask[..., compacted:] = mask[..., compacted:].masked_fill(~allowed, torch.finfo(head_bias.dtype).min)
    return mask


def kvcompact_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query [B, Hq, n, d], key/value [B, Hkv, S, d] -> ([B, n, Hq, dv], None)."""
    capture = active_capture()
    if capture is not None:
        capture.add(module.layer_idx, query)
    layer = getattr(key, "_kvcompact_layer", None)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    hq, hkv, n = query.shape[1], key.shape[1], query.shape[2]
    mask = biased_mask(layer.head_bias(hq // hkv, query.dtype), layer.compacted, attention_mask, n)
    if query.is_cuda and SDPA_BACKENDS:
        # cuDNN's attention, which SDPA prefers for masked bf16 on Hopper, plans per shape: a new plan
        # for every decoding step. Memory-efficient attention takes the mask and any length; it has
        # no GQA, so the KV heads are repeated (decoding reads the small compacted cache anyway).
        from torch.nn.attention import sdpa_kernel

        if hq != hkv:
            key, value = key.repeat_interleave(hq // hkv, dim=1), value.repeat_interleave(hq // hkv, dim=1)
        with sdpa_kernel(SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=hq != hkv)
    return out.transpose(1, 2).contiguous(), None


def _default_backends() -> list:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


SDPA_BACKENDS[:] = _default_backends()


def enable(model) -> None:
    """Registers the attention (and transformers' SDPA mask under the same name) and selects it for
    `model`. Uncompacted layers and caches keep working through it exactly as with "sdpa"."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kvcompact_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
