"""The real SmolLM2-135M-Instruct GGUF loaded by transformers itself (the `gguf` package) against
kvcompact.runtime on the same blocks: a context compacted by the real service with ragged
per-head budgets gives the same teacher-forced log-probabilities and the same greedy answer
through `model.generate()` as the numpy runtime, and the same logits without compaction.
Skipped without torch and transformers."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvcompact import Client, hf  # noqa: E402
from kvcompact.runtime import LlamaModel  # noqa: E402
from kvcompact.runtime.compaction import compact_cache  # noqa: E402
from kvcompact.runtime.llama import find_model_file  # noqa: E402
from kvcompact.runtime import queries as rq  # noqa: E402

TEXT = ("The harbour town of Ness had three bridges, a lighthouse painted green, and a baker named Ilsa who opened "
        "at five every morning except on the first Sunday of the month, when she sailed to the island of Orm to buy "
        "flour from the mill her grandfather had built. ") * 4


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(find_model_file())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return LlamaModel(), model


def test_transformers_on_service_blocks_matches_the_numpy_runtime(models, server_address):
    runtime, model = models
    tok = runtime.tokenizer
    head = tok.encode(tok.apply_chat_template([{"role": "user", "content": "@@"}], add_generation_prompt=False)
                      .split("@@")[0])
    context = head + tok.encode(TEXT)
    question = tok.encode("\n\nWho sails to Orm, and why?<|im_end|>\n<|im_start|>assistant\n")
    answer = tok.encode("Ilsa the baker sails to Orm to buy flour from her grandfather's mill.")
    cache, queries = rq.context_prefill(runtime, context)
    budgets = [24, 40, 64] * runtime.config.num_layers  # ragged: one budget per (layer, KV head)
    with Client(server_address) as client:
        compact_cache(cache, client, queries, 4, len(context), per_head=budgets, method="am")
    blocks = [[(h.keys, h.values, h.bias) for h in layer] for layer in cache.heads]
    assert sorted({len(h.bias) for layer in cache.heads for h in layer}) == [28, 44, 68]

    seq = question + answer
    want = runtime.log_probs(seq, cache.copy())
    got = hf.log_probs(model, hf.from_runtime_blocks(blocks, len(context), interleaved_rope=True), seq)
    print(f"max |dlogp| {np.abs(got - want).max():.2e} over {len(seq) - 1} tokens")
    assert np.abs(got - want).max() < 2e-4, np.abs(got - want).max()

    # Greedy decoding through generate() on the same blocks: the runtime's tokens.
    want_tokens = runtime.generate(question, cache.copy(), max_new_tokens=16)
    compacted = hf.from_runtime_blocks(blocks, len(context), interleaved_rope=True)
    got_tokens = hf.generate(model, compacted, [question], max_new_tokens=len(want_tokens), do_sample=False)[0]
    assert got_tokens == want_tokens, (tok.decode(got_tokens), tok.decode(want_tokens))


def test_transformers_and_the_numpy_runtime_give_the_same_logits(models):
    runtime, model = models
    tok = runtime.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": TEXT[:300]}], add_generation_prompt=True))
    want = runtime.forward(ids, runtime.new_cache())
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    print(f"max |dlogit| {np.abs(got - want).max():.2e} over {len(ids)} tokens")
    assert np.abs(got - want).max() < 5e-4, np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
