"""The transformers adapter's attention against explicit math (needs torch; skipped without it).
The end-to-end check with a real model is tools/check_hf_adapter.py (docs/RUNTIME.md)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvcompact import hf  # noqa: E402


class _Module:
    def __init__(self, layer_idx):
        self.layer_idx = layer_idx


def test_attention_applies_beta_per_kv_head_padding_and_causality():
    rng = np.random.default_rng(0)
    hkv, group, d, n = 2, 3, 8, 4
    # Ragged cached heads: 5 and 3 entries; then n new tokens appended by update().
    blocks = [[(rng.normal(size=(5, d)).astype(np.float32), rng.normal(size=(5, d)).astype(np.float32),
                rng.normal(size=5).astype(np.float32)),
               (rng.normal(size=(3, d)).astype(np.float32), rng.normal(size=(3, d)).astype(np.float32),
                rng.normal(size=3).astype(np.float32))]]
    cache = hf.CompactedCache.from_blocks(blocks, logical_length=100)
    k_new = torch.tensor(rng.normal(size=(1, hkv, n, d)), dtype=torch.float32)
    v_new = torch.tensor(rng.normal(size=(1, hkv, n, d)), dtype=torch.float32)
    keys, values = cache.update(k_new, v_new, 0)
    q = torch.tensor(rng.normal(size=(1, hkv * group, n, d)), dtype=torch.float32)
    out, _ = hf.kvcompact_attention(_Module(0), q, keys, values, None, scaling=0.3, kvcompact_cache=cache)
    assert out.shape == (1, n, hkv * group, d)
    for g in range(hkv):
        bk, bv, bb = blocks[0][g]
        k_all = np.concatenate([bk, k_new[0, g].numpy()])
        v_all = np.concatenate([bv, v_new[0, g].numpy()])
        b_all = np.concatenate([bb, np.zeros(n, np.float32)])
        for hq in range(g * group, (g + 1) * group):
            for i in range(n):
                seen = len(bb) + i + 1
                logits = 0.3 * k_all[:seen] @ q[0, hq, i].numpy() + b_all[:seen]
                w = np.exp(logits - logits.max())
                want = (w[:, None] * v_all[:seen]).sum(0) / w.sum()
                np.testing.assert_allclose(out[0, i, hq].numpy(), want, rtol=1e-5, atol=1e-5)
