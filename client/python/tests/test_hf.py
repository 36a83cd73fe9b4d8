"""kvcompact.hf on tiny random-weight models of each family built from configs (no downloads):
keep-everything caches reproduce the uncompacted model's `generate()`, ragged heads and beta
follow the explicit math, batches of different lengths match their rows alone, and compacted
caches come back through the real server. On a GPU the same tests run in bf16 and fp32 as well
(skipped without torch; KVCOMPACT_HF_DEVICES=cpu,cuda picks devices)."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvcompact import hf  # noqa: E402

VOCAB = 101


def _devices():
    wanted = os.environ.get("KVCOMPACT_HF_DEVICES", "cpu,cuda").split(",")
    out = [("cpu", torch.float32)] if "cpu" in wanted else []
    if "cuda" in wanted and torch.cuda.is_available():
        out += [("cuda", torch.float32), ("cuda", torch.bfloat16)]
    return out


DEVICES = _devices()
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def tiny_model(family: str, device="cpu", dtype=torch.float32, seed=0):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = transformers.Qwen3Config(head_dim=16, **common), transformers.Qwen3ForCausalLM
    elif family == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM
    else:  # two sliding-window layers of 16 tokens (kept exact), then a global one (compacted)
        cfg = transformers.Gemma3TextConfig(head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                            **common)
        cls = transformers.Gemma3ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval().to(device=device, dtype=dtype)
    model.generation_config.pad_token_id = 0
    return model


def _ids(n, seed):
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def keep_all_cache(model, ids):
    """A CompactedCache holding every prefill entry exactly (beta 0): must equal no compaction."""
    cache, _ = hf.prefill(model, ids)
    layers = hf.compactable_layers(model)
    compacted = {l: [(cache.layers[l].keys[0, g], cache.layers[l].values[0, g],
                      torch.zeros(len(ids), device=cache.layers[l].keys.device))
                     for g in range(cache.layers[l].keys.shape[1])] for l in layers}
    exact = {l: cache.layers[l] for l in range(len(cache.layers)) if l not in layers}
    return hf.CompactedCache.from_layers(compacted, exact, len(cache.layers), len(ids))


def _generate(model, cache, prompts, steps=8):
    inputs = cache.generate_inputs(prompts)
    out = model.generate(**inputs, past_key_values=cache.copy(), max_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    width = inputs["input_ids"].shape[1]
    return out.sequences[:, width:], torch.stack(out.logits, 1).float()


def _reference_logits(model, full_ids):
    """The uncompacted model's logits for each position of `full_ids` (transformers' sdpa)."""
    with torch.no_grad():
        return model(input_ids=torch.as_tensor([full_ids], device=model.device)).logits[0].float()


def _tolerance(dtype):
    return 1e-4 if dtype == torch.float32 else 6e-2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("device,dtype", DEVICES)
def test_keep_all_cache_generates_what_the_uncompacted_model_does(family, device, dtype):
    model = tiny_model(family, device, dtype)
    context, prompt = _ids(40, 1), _ids(5, 2)
    tokens, logits = _generate(model, keep_all_cache(model, context), [prompt])
    tokens = tokens[0].tolist()
    # Teacher-forced through the plain model on the generated sequence: the same logits at every step.
    ref = _reference_logits(model, context + prompt + tokens)[len(context) + len(prompt) - 1:-1]
    scale = ref.abs().max().item()
    assert (logits[0] - ref).abs().max().item() <= _tolerance(dtype) * max(1.0, scale)
    if dtype == torch.float32:  # greedy choices equal (bf16 may break near-ties differently)
        assert tokens == ref.argmax(-1).tolist()


@pytest.mark.parametrize("family", ("llama", "gemma3"))
@pytest.mark.parametrize("device,dtype", DEVICES)
def test_a_batch_of_different_lengths_decodes_each_row_as_alone(family, device, dtype):
    model = tiny_model(family, device, dtype)
    contexts, prompts = [_ids(40, 3), _ids(23, 4), _ids(9, 5)], [_ids(5, 6), _ids(2, 7), _ids(4, 8)]
    caches = [keep_all_cache(model, c) for c in contexts]
    batch, inputs = hf.batch_inputs(model, caches, prompts)
    out = model.generate(**inputs, past_key_values=batch, max_new_tokens=8, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    batch_tokens, batch_logits = out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()
    for b, (cache, prompt) in enumerate(zip(caches, prompts)):
        tokens, logits = _generate(model, cache, [prompt])
        assert (batch_logits[b] - logits[0]).abs().max().item() <= _tolerance(dtype) * max(1.0, logits.abs().max().item())
        if dtype == torch.float32:
            assert batch_tokens[b].tolist() == tokens[0].tolist()


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_ragged_heads_and_beta_follow_the_explicit_math(device, dtype):
    model = tiny_model("llama", device, dtype)
    rng = np.random.default_rng(0)
    cfg = model.config
    d, hkv, group = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads, 2
    lengths = [7, 3]  # ragged: the shorter head is padded
    heads = [(torch.tensor(rng.normal(size=(t, d)), dtype=dtype, device=device),
              torch.tensor(rng.normal(size=(t, d)), dtype=dtype, device=device),
              torch.tensor(rng.normal(size=t), dtype=torch.float32, device=device)) for t in lengths]
    cache = hf.CompactedCache.from_layers({0: heads}, {}, 1, logical_length=100)
    n = 4
    k_new = torch.tensor(rng.normal(size=(1, hkv, n, d)), dtype=dtype, device=device)
    v_new = torch.tensor(rng.normal(size=(1, hkv, n, d)), dtype=dtype, device=device)
    keys, values = cache.layers[0].update(k_new, v_new)
    assert cache.get_seq_length() == 100 + n  # positions continue at the logical length
    q = torch.tensor(rng.normal(size=(1, hkv * group, n, d)), dtype=dtype, device=device)

    class Module:
        layer_idx = 0

    out, _ = hf.kvcompact_attention(Module(), q, keys, values, None, scaling=0.3)
    for g, (hk, hv, hb) in enumerate(heads):
        k_all = torch.cat([hk, k_new[0, g]]).double().cpu()
        v_all = torch.cat([hv, v_new[0, g]]).double().cpu()
        b_all = torch.cat([hb.double().cpu(), torch.zeros(n, dtype=torch.float64)])
        for h in range(g * group, (g + 1) * group):
            for i in range(n):
                seen = len(hb) + i + 1
                w = torch.softmax(0.3 * k_all[:seen] @ q[0, h, i].double().cpu() + b_all[:seen], 0)
                want = w @ v_all[:seen]
                torch.testing.assert_close(out[0, i, h].double().cpu(), want, rtol=0, atol=_tolerance(dtype) * 20)


def test_query_capture_pools_query_heads_per_kv_head_at_the_chosen_positions():
    model = tiny_model("qwen3")
    ids = _ids(30, 9)
    cache, queries = hf.context_prefill(model, ids, keep=6, seed=3)
    layers = hf.compactable_layers(model)
    assert sorted(queries) == layers and cache.get_seq_length() == 30
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for l in layers:
        assert tuple(queries[l].shape) == (cfg.num_key_value_heads, group * 6, cfg.head_dim)
    # Capturing everything, then picking the same positions, gives the same rows.
    cap = hf.QueryCapture(layers)
    hf.prefill(model, ids, capture=cap, chunk=7)  # chunked prefill: the stream's positions still count from 0
    every = cap.queries(cfg.num_key_value_heads)
    from kvcompact.hf.capture import sample_positions
    pos = sample_positions(30, 6, 3)
    for l in layers:
        full = every[l].reshape(cfg.num_key_value_heads, group, 30, -1)[:, :, pos]
        torch.testing.assert_close(queries[l], full.reshape(cfg.num_key_value_heads, group * 6, -1))


def test_repeat_detail_counts_the_repeat_queries_before_the_least_predictable_tokens_twice():
    from kvcompact.client import detail_positions
    from kvcompact.hf.compact import ChatFormat, capture_queries

    model = tiny_model("llama")
    fmt = ChatFormat(_Tokenizer())
    ids = _ids(40, 5)
    cfg = model.config
    kv, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    surprisal = []
    _, every = capture_queries(model, ids, "repeat-prefill", fmt, max_queries=10_000, surprisal=surprisal)
    assert len(surprisal) == 40 and surprisal[0] == 0 and min(surprisal[1:]) > 0
    detail = detail_positions(surprisal, 0.1)
    assert len(detail) == 4 and max(surprisal[p + 1] for p in detail) == max(surprisal[1:])
    _, both = capture_queries(model, ids, "repeat-prefill+repeat-detail", fmt, max_queries=10_000, detail_share=0.1)
    _, alone = capture_queries(model, ids, "repeat-detail", fmt, max_queries=10_000, detail_share=0.1)
    twice = np.sort(np.concatenate([np.arange(40), detail]))
    for l in hf.compactable_layers(model):
        rows = every[l].reshape(kv, group, 40, -1)
        torch.testing.assert_close(both[l], rows[:, :, twice].reshape(kv, group * 44, -1))
        torch.testing.assert_close(alone[l], rows[:, :, detail].reshape(kv, group * 4, -1))
    # Below the context's length the cap still holds (the details sampled at repeat-prefill's rate).
    _, capped = capture_queries(model, ids, "repeat-prefill+repeat-detail", fmt, max_queries=10 * group,
                                detail_share=0.1)
    assert capped[hf.compactable_layers(model)[0]].shape[1] == group * 10


def test_detail_questions_add_the_queries_of_questions_about_named_numbers_and_their_answers():
    from kvcompact.client import detail_questions
    from kvcompact.hf.compact import ChatFormat, capture_queries

    model = tiny_model("llama")
    tok = _Tokenizer()
    fmt = ChatFormat(tok)
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    ids = fmt.context("the crate code is 41 and the gate code is 77 " * 2)
    surprisal = []
    _, alone = capture_queries(model, ids, "repeat-prefill", fmt, max_queries=10_000, surprisal=surprisal)
    asked = detail_questions([tok.decode([t]) for t in ids], surprisal, count=8)
    assert 1 <= len(asked) <= 4 and all(q.startswith("What is the number after") for q in asked)
    _, both = capture_queries(model, ids, "repeat-prefill+detail-questions", fmt, max_queries=10_000)
    l = hf.compactable_layers(model)[0]
    extra = both[l].shape[1] - alone[l].shape[1]
    # Each question's own tokens at least, and at most 8 answer tokens each, per query head.
    assert extra % group == 0
    assert sum(len(fmt.instruction(q)) for q in asked) <= extra // group <= sum(len(fmt.instruction(q)) + 8 for q in asked)
    torch.testing.assert_close(both[l][:, :alone[l].shape[1]], alone[l])
    # The narrative-or-unknown mix: the same queries, then the self-study answers'.
    _, details = capture_queries(model, ids, "repeat-prefill+repeat-detail+detail-questions", fmt, max_queries=10_000)
    _, every = capture_queries(model, ids, "repeat-prefill+repeat-detail+detail-questions+self-study", fmt,
                               max_queries=10_000)
    assert every[l].shape[1] > details[l].shape[1]
    torch.testing.assert_close(every[l][:, :details[l].shape[1]], details[l])
    # No named number: the source adds nothing, and alone it is an error rather than an empty fit.
    plain = fmt.context("the crate holds salt and the gate is green " * 2)
    _, a = capture_queries(model, plain, "repeat-prefill", fmt, max_queries=10_000)
    _, b = capture_queries(model, plain, "repeat-prefill+detail-questions", fmt, max_queries=10_000)
    torch.testing.assert_close(a[l], b[l])
    with pytest.raises(ValueError, match="captured no queries"):
        capture_queries(model, plain, "detail-questions", fmt, max_queries=10_000)


def test_gemma3_sliding_layers_stay_exact_and_only_global_layers_are_compactable():
    model = tiny_model("gemma3")
    assert hf.compactable_layers(model) == [2]
    cache = keep_all_cache(model, _ids(40, 10))
    assert isinstance(cache.layers[2], hf.CompactedLayer)
    assert not isinstance(cache.layers[0], hf.CompactedLayer) and cache.layers[0].keys.shape[2] < 40


class _Tokenizer:
    """Enough of a tokenizer for the helpers on a tiny model: one token per character."""

    chat_template = None
    bos_token, eos_token_id = "", 0

    def encode(self, text, add_special_tokens=False):
        return [1 + (ord(ch) % (VOCAB - 1)) for ch in text]

    def decode(self, ids, skip_special_tokens=True):  # digits come back as digits (ids 49-58)
        return "".join(chr(i - 1) if 49 <= i <= 58 else chr(96 + (i % 26)) for i in ids)


@pytest.mark.parametrize("family", ("llama", "gemma3"))
def test_compaction_through_the_real_server(family, server_address):
    model = tiny_model(family)
    tok = _Tokenizer()
    text = "The ledger of the harbour: crate 41 holds salt, crate 77 holds rope. " * 4
    ids = hf.ChatFormat(tok).context(text)
    # Budget >= the span: the service returns it exactly, so generation equals the uncompacted model's.
    full = hf.compact_ids(model, ids, server=server_address, tokens=len(ids), queries="context-prefill",
                          keep_first=2, keep_last=0, streams=2)
    prompt = hf.question_ids(tok, "Which crate holds rope?")
    tokens, logits = _generate(model, full, [prompt])
    ref = _reference_logits(model, ids + prompt + tokens[0].tolist())[len(ids) + len(prompt) - 1:-1]
    assert (logits[0] - ref).abs().max().item() < 1e-4
    # 10x with repeat-prefill and self-study queries: 10x fewer entries, logical positions kept.
    small = hf.compact_ids(model, ids, server=server_address, ratio=10, queries="repeat-prefill+self-study",
                           tokenizer=tok, keep_first=2, keep_last=4)
    layer = small.layers[hf.compactable_layers(model)[0]]
    assert layer.keys.shape[2] <= 2 + 4 + -(-(len(ids) - 6) // 10) + 1
    assert small.get_seq_length() == len(ids)
    tokens, logits = _generate(model, small, [prompt])
    assert torch.isfinite(logits).all() and tokens.shape == (1, 8)
    assert hf.generate(model, small, [prompt], max_new_tokens=8, do_sample=False)[0] == tokens[0].tolist()
    # Named positions stay exact (bias 0) inside the same budget.
    named = [10, 11, 12, 40]
    guarded = hf.compact_ids(model, ids, server=server_address, ratio=10, queries="context-prefill", keep_first=2,
                             protected=named)
    layer_idx = hf.compactable_layers(model)[0]
    layer, full_layer = guarded.layers[layer_idx], full.layers[layer_idx]
    assert layer.keys.shape[2] == 2 + round((len(ids) - 2) / 10)
    for g in range(layer.keys.shape[1]):
        torch.testing.assert_close(layer.keys[0, g, -len(named):], full_layer.keys[0, g, torch.tensor(named)])  # the keep-all cache holds position p at p
        assert not layer.bias[0, g, -len(named):].any()
    with pytest.raises(ValueError, match="compacted span"):
        hf.compact_ids(model, ids, server=server_address, ratio=10, queries="context-prefill", keep_first=2,
                       protected=[0])
    texts = hf.answer(model, tok, text, ["Which crate holds rope?", "And salt?"], server=server_address, ratio=10,
                      queries="context-prefill", max_new_tokens=5)
    assert len(texts) == 2 and all(len(t) <= 5 for t in texts)


def test_numbers_are_kept_exact_by_default_for_text_contexts(server_address):
    from kvcompact.client import number_positions, ratio_budget

    model = tiny_model("llama")
    tok = _Tokenizer()
    text = "Crate 41 holds salt and the rope lies in the shed by the gate. " * 3
    ids = hf.ChatFormat(tok).context(text)
    budget = ratio_budget(len(ids) - 2, 4)
    want = number_positions([tok.decode([t]) for t in ids], budget, before=3, start=2)
    assert len(want) == 3 * 5 and len(want) <= budget // 2  # each "41" with " te" before it: the cap does not bind
    full = hf.compact_ids(model, ids, server=server_address, tokens=len(ids), queries="context-prefill", keep_first=2)
    kept = hf.compact_context(model, tok, text, server=server_address, ratio=4, queries="context-prefill",
                              keep_first=2)
    plain = hf.compact_context(model, tok, text, server=server_address, ratio=4, queries="context-prefill",
                               keep_first=2, protect=None)
    l = hf.compactable_layers(model)[0]
    assert kept.layers[l].keys.shape[2] == plain.layers[l].keys.shape[2] == 2 + budget
    for g in range(kept.layers[l].keys.shape[1]):
        torch.testing.assert_close(kept.layers[l].keys[0, g, -len(want):], full.layers[l].keys[0, g, torch.from_numpy(want)])
        assert not kept.layers[l].bias[0, g, -len(want):].any()
    with pytest.raises(ValueError, match="needs the tokenizer"):
        hf.compact_ids(model, ids, server=server_address, ratio=4, queries="context-prefill", protect="numbers")
    with pytest.raises(ValueError, match="only 'numbers'"):
        hf.compact_ids(model, ids, server=server_address, ratio=4, tokenizer=tok, protect="names")


def test_bad_arguments_are_refused_before_anything_is_sent():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="queries must be"):
        hf.compact_ids(model, _ids(20, 1), server="127.0.0.1:1", queries="psychic")
    with pytest.raises(ValueError, match="leave nothing"):
        hf.compact_ids(model, _ids(20, 1), server="127.0.0.1:1", keep_first=15, keep_last=5)
    with pytest.raises(ValueError, match="not per_head"):
        hf.compact_ids(model, _ids(20, 1), server="127.0.0.1:1", protected=[6], per_head=[3] * 8)
    for queries in ("repeat-prefill", "repeat-detail", "self-study"):
        with pytest.raises(ValueError, match="need the tokenizer"):
            hf.compact_ids(model, _ids(20, 1), server="127.0.0.1:1", queries=queries)
    cache = keep_all_cache(model, _ids(20, 1))
    with pytest.raises(ValueError, match="prompts for a cache of batch"):
        cache.generate_inputs([[1], [2]])
    with pytest.raises(ValueError, match="only 0 were appended"):
        cache.layers[0].crop(-1)


@pytest.mark.parametrize("family", ("llama", "qwen3"))
def test_re_rotated_keys_at_physical_positions_decode_as_logical_positions_do(family):
    model = tiny_model(family)
    context, prompt = _ids(48, 11), _ids(4, 12)
    full, _ = hf.prefill(model, context)
    keep = torch.arange(0, 48, 3)  # a third of the entries, with some beta: P = 16 of T = 48
    rng = torch.Generator().manual_seed(0)
    compacted = {l: [(full.layers[l].keys[0, g, keep], full.layers[l].values[0, g, keep],
                      torch.randn(len(keep), generator=rng)) for g in range(full.layers[l].keys.shape[1])]
                 for l in hf.compactable_layers(model)}
    logical = hf.CompactedCache.from_layers(compacted, {}, len(full.layers), len(context))
    physical = hf.with_physical_positions(model, logical)
    assert physical.get_seq_length() == len(keep)
    tokens, logits = _generate(model, logical, [prompt])
    tokens_p, logits_p = _generate(model, physical, [prompt])
    assert tokens.tolist() == tokens_p.tolist()
    assert (logits - logits_p).abs().max().item() < 1e-4


def test_sampling_streamer_and_stopping_criteria_work_from_a_compacted_cache():
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    class StopAfter(StoppingCriteria):
        def __init__(self, width, n):
            self.width, self.n = width, n

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.width + self.n, dtype=torch.bool)

    model = tiny_model("llama")
    cache = keep_all_cache(model, _ids(30, 13))
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        batch, inputs = hf.batch_inputs(model, [cache], [_ids(3, 14)])
        streamer = Collect()
        width = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, past_key_values=batch, do_sample=True, top_k=20, temperature=0.9,
                             max_new_tokens=50, streamer=streamer,
                             stopping_criteria=StoppingCriteriaList([StopAfter(width, 5)]))
        new = out[0, width:].tolist()
        assert len(new) == 5  # stopped by the criterion, not by max_new_tokens
        streamed = [t for chunk in streamer.chunks[1:-1] for t in (chunk if isinstance(chunk, list) else [chunk])]
        assert streamed == new and streamer.chunks[-1] == "end"  # the prompt first, then each new token
        runs.append(new)
    assert runs[0] == runs[1]  # sampling from the compacted cache is reproducible under a seed
