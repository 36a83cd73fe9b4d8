"""The Python client against the real server: shapes, exact key copies, ragged budgets, dtypes,
parallel streams, errors."""
import numpy as np
import pytest

from kvcompact import Client, CompactError, Layer, compact
from kvcompact.proto import pb


def make_layers(num_layers=2, heads=2, tokens=512, queries=256, d=64, seed=0, dtype=np.float32):
    """Attention that is uneven (a shared topic direction, a few heavy-hitter keys) and values
    with a head-specific offset, as in trained models."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(num_layers):
        topic = rng.normal(size=(heads, 1, d))
        heavy = (rng.random((heads, tokens, 1)) < 0.02) * 0.6
        k = 1.2 * rng.normal(size=(heads, tokens, d)) + heavy * topic
        v = rng.normal(size=(heads, 1, d)) + rng.normal(size=(heads, tokens, d))
        q = 1.2 * rng.normal(size=(heads, queries, d)) + 0.5 * topic
        layers.append(Layer(i, k.astype(dtype), v.astype(dtype), q.astype(dtype)))
    return layers


def test_info_and_self_test(server_address):
    with Client(server_address) as client:
        info = client.info()
        assert info.backend in info.backends
        assert "am" in info.methods
        st = client.self_test(tokens=512, queries=256)
        names = [r.method_name for r in st.results]
        assert names == ["am", "h2o", "snapkv"]
        assert st.results[0].output_rel_error < st.results[1].output_rel_error


def test_ragged_budgets_and_exact_key_copies(server_address):
    layers = make_layers()
    budgets = [10, 40, 25, 7]
    with Client(server_address) as client:
        result = client.compact(layers, per_head=budgets)
    assert not result.errors
    assert sorted(result.layers) == [0, 1]
    for li, layer in result.layers.items():
        for h, head in enumerate(layer.heads):
            t = budgets[li * 2 + h]
            assert head.keys.shape == (t, 64) and head.values.shape == (t, 64) and head.beta.shape == (t,)
            assert head.indices.shape == (t,)
            assert np.array_equal(head.keys, layers[li].keys[h][head.indices])
            assert np.all(np.diff(head.indices) > 0)
            assert np.isfinite(head.beta).all() and np.isfinite(head.values).all()
            assert head.tokens_in == 512
            assert 0 <= head.output_rel_error < 1
    assert result.summary.layers_done == 2
    assert result.summary.tokens_out == sum(budgets)


def test_am_beats_eviction_baselines(server_address):
    layers = make_layers(tokens=1024, queries=512, seed=3)
    errors = {}
    with Client(server_address) as client:
        for method in ("am", "h2o", "snapkv"):
            r = client.compact(layers, ratio=20, method=method)
            errors[method] = np.mean([h.output_rel_error for l in r.layers.values() for h in l.heads])
    assert errors["am"] < 0.8 * errors["h2o"], errors
    assert errors["am"] < 0.8 * errors["snapkv"], errors


def test_half_precision_in_and_bf16_out(server_address):
    layers = make_layers(dtype=np.float16, seed=4)
    with Client(server_address) as client:
        result = client.compact(layers, ratio=8, output_dtype="bf16")
    head = result.layers[0].heads[0]
    assert head.keys.dtype.name == "bfloat16" and head.keys.itemsize == 2  # as asked, not widened
    assert head.values.dtype.name == "bfloat16" and head.beta.dtype == np.float32
    sent = layers[0].keys[0][head.indices].astype(np.float32)
    assert np.allclose(head.keys.astype(np.float32), sent, rtol=1e-2, atol=1e-2)


def test_parallel_streams_match_one_stream(server_address):
    layers = make_layers(num_layers=4, tokens=256, queries=128, seed=5)
    with Client(server_address) as one, Client(server_address, streams=3, max_message_bytes=64 << 10) as three:
        a = one.compact(layers, ratio=8)
        b = three.compact(layers, ratio=8)
    assert sorted(a.layers) == sorted(b.layers) == [0, 1, 2, 3]
    for i in a.layers:
        for ha, hb in zip(a.layers[i].heads, b.layers[i].heads):
            assert np.array_equal(ha.indices, hb.indices)
            assert np.array_equal(ha.beta, hb.beta)
            assert np.array_equal(ha.values, hb.values)


def test_bad_budget_raises_with_status(server_address):
    with Client(server_address) as client:
        with pytest.raises(CompactError) as err:
            client.compact(make_layers(num_layers=1), ratio=0)
    assert err.value.code.name == "INVALID_ARGUMENT"
    assert "budget.ratio must be > 0" in err.value.message


def test_bad_layer_is_reported_and_others_compact(server_address):
    layers = make_layers(seed=6)
    layers[1].keys[0, 5, 3] = np.nan
    with Client(server_address) as client:
        result = client.compact(layers, ratio=8)
    assert list(result.layers) == [0]
    assert "non-finite" in result.errors[1]


def test_compact_convenience_with_stacked_arrays(server_address):
    layers = make_layers(num_layers=3, tokens=128, queries=64, seed=7)
    K = np.stack([l.keys for l in layers])
    V = np.stack([l.values for l in layers])
    Q = np.stack([l.queries for l in layers])
    result = compact(K, V, Q, server=server_address, tokens=16, method="h2o")
    assert [len(l.heads) for l in result.layers.values()] == [2, 2, 2]
    assert all(h.keys.shape == (16, 64) for l in result.layers.values() for h in l.heads)
    assert result.summary.backend in ("cpu", "cuda")


def test_bad_option_names_raise_value_error_listing_the_choices(server_address):
    with Client(server_address) as client:
        for option, value in (("method", "amm"), ("score", "median"), ("output_dtype", "fp8"), ("allocation", "even")):
            with pytest.raises(ValueError) as err:
                client.compact(make_layers(num_layers=1), ratio=8, **{option: value})
            assert repr(value) in str(err.value) and "one of" in str(err.value)


def test_missing_queries_raise_before_sending(server_address):
    layers = make_layers(num_layers=2)
    layers[1].queries = None
    with Client(server_address) as client:
        for method in ("am", "h2o", "am_omp"):
            with pytest.raises(ValueError, match="needs reference queries"):
                client.compact(layers, ratio=8, method=method)
        with pytest.raises(ValueError, match="needs reference queries"):
            client.compact(iter(layers), ratio=8, num_layers=2)  # streamed: refused when layer 1 comes
        result = client.compact(layers, ratio=8, method="streaming_llm")  # query-free: fine
    assert sorted(result.layers) == [0, 1] and not result.errors


def test_layers_from_a_generator_match_a_list(server_address):
    layers = make_layers(num_layers=4, tokens=256, queries=128, seed=8)
    produced = []

    def engine():  # yields each layer as it is "computed"
        for layer in layers:
            produced.append(layer.index)
            yield layer

    with Client(server_address) as one, Client(server_address, streams=2) as two:
        a = one.compact(layers, ratio=8)
        b = two.compact(engine(), ratio=8, num_layers=4)
        with pytest.raises(ValueError, match="num_layers"):
            one.compact(iter(layers), ratio=8)
    assert produced == [0, 1, 2, 3] and sorted(b.layers) == [0, 1, 2, 3]
    for i in a.layers:
        for ha, hb in zip(a.layers[i].heads, b.layers[i].heads):
            assert np.array_equal(ha.indices, hb.indices) and np.array_equal(ha.values, hb.values)


def test_asyncio_client_matches_the_blocking_one(server_address):
    import asyncio

    from kvcompact.aio import AsyncClient

    layers = make_layers(num_layers=3, tokens=256, queries=128, seed=9)

    async def agen():
        for layer in layers:
            await asyncio.sleep(0)
            yield layer

    async def main():
        async with AsyncClient(server_address, streams=2) as client:
            info = await client.info()
            from_list = await client.compact(layers, ratio=8)
            from_agen = await client.compact(agen(), ratio=8, num_layers=3)
            with pytest.raises(CompactError) as err:
                await client.compact(layers, ratio=0)
            return info, from_list, from_agen, err.value

    info, from_list, from_agen, error = asyncio.run(main())
    assert info.backend in ("cpu", "cuda") and error.code.name == "INVALID_ARGUMENT"
    with Client(server_address) as client:
        ref = client.compact(layers, ratio=8)
    for got in (from_list, from_agen):
        assert sorted(got.layers) == [0, 1, 2]
        for i in ref.layers:
            for hr, hg in zip(ref.layers[i].heads, got.layers[i].heads):
                assert np.array_equal(hr.indices, hg.indices) and np.array_equal(hr.beta, hg.beta)


def test_messages_stay_under_the_limit():
    from kvcompact.client import _chunks
    layer = make_layers(num_layers=1, tokens=3000, queries=700, seed=8)[0]
    msgs = list(_chunks(layer, 100 << 10))
    assert all(m.ByteSize() <= 100 << 10 for m in msgs)
    assert sum((m.kv.head_end - m.kv.head_begin) * m.kv.keys.shape[1] for m in msgs if m.HasField("kv")) == 2 * 3000
    assert msgs[-1].HasField("layer_end")
    assert pb.CompactRequest.FromString(msgs[0].SerializeToString()) == msgs[0]


def test_ratio_budget_rounds_as_the_server_does():
    from kvcompact.client import ratio_budget

    assert ratio_budget(200, 10) == 20
    assert ratio_budget(25, 10) == 3      # 2.5: halves away from zero (llround), not to even
    assert ratio_budget(15, 10) == 2
    assert ratio_budget(7, 100) == 1      # never below one entry
    assert ratio_budget(7, 1e-30) == 7    # nor above T
    with pytest.raises(ValueError):
        ratio_budget(10, 0)


def test_number_positions_keep_whole_numbers_with_their_names_least_predictable_first():
    from kvcompact.client import number_positions
    #          0    1      2      3    4    5     6    7    8      9     10   11    12
    pieces = ["<s>", "key", " is", " 4", "82", ".", " the", "a", " 7", " and", " x", "9", "9"]
    # Every number with the 2 tokens before it; spans start no earlier than `start`.
    assert number_positions(pieces, 100, before=2, start=1).tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    assert number_positions(pieces, 100, before=0, start=0).tolist() == [3, 4, 8, 11, 12]
    assert number_positions(pieces, 100, before=0, start=0, end=12).tolist() == [3, 4, 8, 11]
    # The cap (share x budget) takes whole numbers, the most surprising first; no half numbers.
    surprisal = [0, 0, 0, 1, 1, 0, 0, 0, 9, 0, 0, 5, 0]
    assert number_positions(pieces, 8, surprisal=surprisal, share=0.5, before=0).tolist() == [8, 11, 12]
    assert number_positions(pieces, 8, share=0.5, before=0).tolist() == [3, 4, 8]  # in order without surprisal
    assert number_positions(pieces, 8, share=0.25, before=0, surprisal=surprisal).tolist() == [8]
    assert number_positions(["a", "b"], 10).size == 0
    with pytest.raises(ValueError, match="share"):
        number_positions(pieces, 8, share=1.0)
    # `after` adds the tokens that follow each number (not past `end`); the ranking still goes by
    # the digits' own surprisal, not by the words after them.
    assert number_positions(pieces, 100, before=0, after=1).tolist() == [3, 4, 5, 8, 9, 11, 12]
    assert number_positions(pieces, 100, before=0, after=2, end=12).tolist() == [3, 4, 5, 6, 8, 9, 10, 11]
    loud_words = [0, 0, 0, 1, 1, 50, 50, 0, 9, 0, 0, 5, 0]
    assert number_positions(pieces, 8, surprisal=loud_words, share=0.5, before=0, after=1).tolist() == [8, 9, 11, 12]


def test_detail_positions_are_the_ones_before_the_least_predictable_tokens_at_every_share():
    from kvcompact.client import detail_positions
    surprisal = [0.0, 0.1, 5.0, 0.2, 0.3, 9.0, 0.1, 0.0]  # position j predicts token j + 1
    assert detail_positions(surprisal, 1 / 7).tolist() == [4]
    assert detail_positions(surprisal, 2 / 7).tolist() == [1, 4]
    assert detail_positions(surprisal, 1e-9).tolist() == [4]     # never fewer than one
    assert detail_positions(surprisal, 1.0).tolist() == list(range(7))
    assert detail_positions([0.0], 0.5).size == 0                 # one token predicts nothing
    assert detail_positions([0.0, 1.0, 1.0, 1.0], 2 / 3).tolist() == [0, 1]  # ties: the earlier first
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="share"):
            detail_positions(surprisal, bad)


def test_detail_span_questions_name_the_least_predictable_words_of_any_kind():
    from kvcompact.client import detail_questions
    #          0     1        2       3      4         5       6     7     8      9       10    11    12
    pieces = ["<s>", " The", " agent", " is", " Fel", "ix", " Ay", "din", ".", " Badge", " 4", "82", " ."]
    surprisal = [0, 0, 1, 2, 9, 8.5, 8, 3, 7, 0.5, 6, 5, 0]
    asked = detail_questions(pieces, surprisal, count=8, before=2, start=1, spans=True)
    # The most surprising first, each named by the `before` tokens in front of it, from a word's
    # start ("Felix", not "ix"); "ix" (within `before` of " Fel"), "." (punctuation) and "82"
    # (inside the number " 482", named from its first digit) are not asked about.
    assert asked == ['What comes after "agent is" in the text above?',
                     'What comes after "Felix" in the text above?',
                     'What is the number after ". Badge" in the text above?']
    assert detail_questions(pieces, surprisal, count=1, before=2, start=1, spans=True) == asked[:1]
    # Numbers only (the default) asks about the number alone.
    assert detail_questions(pieces, surprisal, count=8, before=2, start=1) == [
        'What is the number after ". Badge" in the text above?']
    # A name already asked about is not asked again; nothing to ask in a text of no words.
    twice = ["<s>", " a", " b", " X", " a", " b", " Y"]
    asked_twice = detail_questions(twice, [0, 0, 0, 9, 0, 0, 8], count=8, before=2, start=1, spans=True)
    assert asked_twice[0] == 'What comes after "a b" in the text above?'
    assert asked_twice.count(asked_twice[0]) == 1  # " Y" is named "a b" too: not asked
    assert detail_questions(["<s>", ".", ","], [0, 5, 5], count=8, before=1, spans=True) == []


def test_protected_plan_splits_the_span_and_the_budget():
    from kvcompact.client import protected_plan

    rest, exact, left = protected_plan(4, 14, [9, 5, 9], ratio=2)
    assert exact.tolist() == [5, 9] and rest.tolist() == [4, 6, 7, 8, 10, 11, 12, 13] and left == 3  # 5 - 2
    assert protected_plan(4, 14, [5], tokens=4)[2] == 3
    with pytest.raises(ValueError, match="either ratio or tokens"):
        protected_plan(4, 14, [5])
    with pytest.raises(ValueError, match="lie in"):
        protected_plan(4, 14, [14], ratio=2)
    with pytest.raises(ValueError, match="leave nothing"):
        protected_plan(4, 14, [4, 5, 6, 7, 8], ratio=2)


def test_allocation_splits_a_ratio_or_a_per_head_token_budget():
    from kvcompact.client import make_header
    layers = make_layers(num_layers=1, tokens=600)
    by_tokens = make_header(layers, tokens=40, allocation="profile", shares=[1, 3])
    assert by_tokens.options.budget.allocation.ratio == pytest.approx(600 / 40)  # round(T / ratio) = 40 per head
    assert make_header(layers, ratio=8, allocation="profile", shares=[1, 3]).options.budget.allocation.ratio == 8
    assert make_header(layers, allocation="profile", shares=[1, 3]).options.budget.allocation.ratio == 20
    with pytest.raises(ValueError, match="not per_head"):
        make_header(layers, per_head=[10, 20], allocation="profile", shares=[1, 3])


def test_coverage_score_keeps_every_querys_most_attended_key(server_address):
    """With as many keys as there are distinct most-attended keys, `score="coverage"` keeps exactly
    those; the rank unions keep half their budget from each ranking (CPU backend)."""
    layers = make_layers(num_layers=1, tokens=300, queries=64, seed=5)
    layer = layers[0]
    tops = [np.unique(np.argmax(layer.queries[h] @ layer.keys[h].T, axis=1)) for h in range(2)]
    with Client(server_address) as client:
        r = client.compact(layers, per_head=[len(t) for t in tops], method="h2o", score="coverage", holdout=0.0)
        for h, head in enumerate(r.layers[0].heads):
            assert np.array_equal(head.indices, tops[h])
        for score in ("rms_max", "rms_coverage"):
            r = client.compact(layers, ratio=10, method="am", score=score)
            assert not r.errors
            assert all(h.keys.shape == (30, 64) and 0 <= h.output_rel_error < 1 for h in r.layers[0].heads)
