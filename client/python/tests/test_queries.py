"""Reference-query capture on the real SmolLM2 weights: the right positions, the cache untouched,
and answers that exist."""
import numpy as np
import pytest

from kvcompact.runtime import LlamaModel
from kvcompact.client import detail_positions, number_spans
from kvcompact.runtime import queries as rq


@pytest.fixture(scope="module")
def model():
    return LlamaModel()


@pytest.fixture(scope="module")
def prefix(model):
    tok = model.tokenizer
    head = tok.encode(tok.apply_chat_template([{"role": "user", "content": "@@"}], add_generation_prompt=False).split("@@")[0])
    doc = tok.encode("The harbour town of Ness had three bridges, a lighthouse painted green, and a baker named Ilsa "
                     "who opened at five every morning except on the first Sunday of the month.")
    return head, doc


def test_context_prefill_shapes(model, prefix):
    head, doc = prefix
    cache, queries = rq.context_prefill(model, head + doc)
    c = model.config
    group = c.num_heads // c.num_kv_heads
    assert len(queries) == c.num_layers
    assert queries[0].shape == (c.num_kv_heads, group * len(head + doc), c.head_dim)
    assert cache.position == len(head + doc)


def test_repeat_prefill_takes_the_repeated_context_positions_and_leaves_the_cache(model, prefix):
    head, doc = prefix
    cache, _ = rq.context_prefill(model, head + doc)
    entries, position = cache.entries(), cache.position
    got = rq.repeat_prefill(model, cache, doc)
    assert cache.entries() == entries and cache.position == position
    # The same queries from one forward over the whole sequence, picked out by hand.
    seq = head + doc + rq.instruction_tokens(model, rq.REPEAT_PROMPT) + doc
    _, whole = model.forward(seq, model.new_cache(), capture_queries=True)
    c = model.config
    group = c.num_heads // c.num_kv_heads
    for l in (0, c.num_layers - 1):
        q = whole[l].reshape(c.num_kv_heads, group, len(seq), c.head_dim)[:, :, len(seq) - len(doc):]
        want = q.reshape(c.num_kv_heads, group * len(doc), c.head_dim)
        assert got[l].shape == want.shape
        np.testing.assert_allclose(got[l], want, rtol=0, atol=2e-3)


def test_self_study_captures_answer_queries(model, prefix):
    head, doc = prefix
    cache, _ = rq.context_prefill(model, head + doc)
    entries = cache.entries()
    got = rq.self_study(model, cache, prompts=rq.SELF_STUDY_PROMPTS[:1], max_new_tokens=8)
    c = model.config
    group = c.num_heads // c.num_kv_heads
    assert cache.entries() == entries
    assert len(got) == c.num_layers
    m = got[0].shape[1]
    assert 0 < m <= 8 * group and m % group == 0
    assert all(q.shape == (c.num_kv_heads, m, c.head_dim) and np.isfinite(q).all() for q in got)


def test_subsample_and_combine():
    rng = np.random.default_rng(0)
    a = [rng.normal(size=(3, 10, 4)).astype(np.float32) for _ in range(2)]
    b = [rng.normal(size=(3, 5, 4)).astype(np.float32) for _ in range(2)]
    both = rq.combine(a, b)
    assert both[1].shape == (3, 15, 4)
    np.testing.assert_array_equal(both[1][:, 10:], b[1])
    picked = rq.subsample(both, 6, rng)
    assert picked[0].shape == (3, 6, 4)
    # The same rows in every layer: each picked row of layer 0 is a row of layer 0's input.
    rows0 = {tuple(r) for r in both[0][0]}
    assert all(tuple(r) in rows0 for r in picked[0][0])
    assert rq.subsample(a, 50, rng) is a


def test_surprisal_matches_teacher_forced_log_probs(model, prefix):
    head, doc = prefix
    _, _, nats = rq.context_prefill(model, head + doc, surprisal=True)
    want = -model.log_probs(head + doc, model.new_cache())
    assert nats.shape == (len(head + doc),) and nats[0] == 0
    np.testing.assert_allclose(nats[1:], want, rtol=1e-4, atol=1e-4)


def test_detail_positions_pick_the_queries_before_the_least_predictable_tokens(model, prefix):
    nats = np.array([0.0, 0.1, 5.0, 0.2, 0.3, 9.0, 0.1, 0.0])
    # Position j predicts token j + 1: tokens 5 and 2 are the surprising ones.
    assert list(detail_positions(nats, share=2 / 7)) == [1, 4]
    head, doc = prefix
    cache, _, s = rq.context_prefill(model, head + doc, surprisal=True)
    positions = detail_positions(s[len(head):], 0.25)
    every = rq.repeat_prefill(model, cache, doc)
    some = rq.repeat_prefill(model, cache, doc, positions=positions)
    c = model.config
    group = c.num_heads // c.num_kv_heads
    for l in (0, c.num_layers - 1):
        want = every[l].reshape(c.num_kv_heads, group, len(doc), c.head_dim)[:, :, positions]
        np.testing.assert_array_equal(some[l], want.reshape(c.num_kv_heads, group * len(positions), c.head_dim))


def test_detail_questions_ask_about_the_least_predictable_named_numbers(model, prefix):
    head, _ = prefix
    tok = model.tokenizer
    doc = tok.encode("The harbour ledger says the locker code is 4417, and crate 12 holds rope.")
    tokens = head + doc
    cache, _, nats = rq.context_prefill(model, tokens, surprisal=True)
    pieces = [tok.decode([t]) for t in tokens]
    spans = number_spans(pieces, surprisal=nats, before=3, start=len(head))
    assert sorted("".join(pieces[d:e]).strip() for _, d, e in spans) == ["12", "4417"]
    assert [max(nats[d:e]) for _, d, e in spans] == sorted((max(nats[d:e]) for _, d, e in spans), reverse=True)
    assert all(e - d >= 1 and d - f <= 3 and f >= len(head) for f, d, e in spans)
    entries = cache.entries()
    c = model.config
    group = c.num_heads // c.num_kv_heads
    one = rq.detail_questions(model, cache, tokens, nats, count=1, answer_tokens=4, start=len(head))
    both = rq.detail_questions(model, cache, tokens, nats, count=2, answer_tokens=4, start=len(head))
    assert cache.entries() == entries
    m1, m2 = one[0].shape[1], both[0].shape[1]
    assert 0 < m1 < m2 and m1 % group == 0 and m2 % group == 0  # a question's tokens, then its answer's
    assert all(q.shape == (c.num_kv_heads, m2, c.head_dim) and np.isfinite(q).all() for q in both)
    # The first question's queries are the same whether or not a second one is asked.
    np.testing.assert_allclose(both[0][:, :m1 // group], one[0][:, :m1 // group], rtol=1e-5, atol=1e-5)
    # A context without a named number gives no queries (and no error).
    plain = head + tok.encode("The harbour town had three bridges and a green lighthouse.")
    cache2, _, nats2 = rq.context_prefill(model, plain, surprisal=True)
    none = rq.detail_questions(model, cache2, plain, nats2, start=len(head))
    assert all(q.shape == (c.num_kv_heads, 0, c.head_dim) for q in none)
