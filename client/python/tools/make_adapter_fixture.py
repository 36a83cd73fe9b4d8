"""Writes the fixture that tools/check_hf_adapter.py checks transformers against: a SmolLM2 context
prefilled by the numpy runtime, compacted by a running service with ragged per-head budgets, and
the runtime's teacher-forced log-probs of a continuation on the full and on the compacted cache.

    python make_adapter_fixture.py --server localhost:50051 --out adapter_fixture.npz
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvcompact import Client  # noqa: E402
from kvcompact.runtime import LlamaModel  # noqa: E402
from kvcompact.runtime import queries as rq  # noqa: E402
from kvcompact.runtime.compaction import compact_cache  # noqa: E402

TEXT = ("The harbour town of Ness had three bridges, a lighthouse painted green, and a baker named Ilsa who opened "
        "at five every morning except on the first Sunday of the month, when she sailed to the island of Orm to buy "
        "flour from the mill her grandfather had built. ") * 6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--out", default="adapter_fixture.npz")
    args = ap.parse_args()
    model = LlamaModel()
    tok = model.tokenizer
    head = tok.encode(tok.apply_chat_template([{"role": "user", "content": "@@"}], add_generation_prompt=False).split("@@")[0])
    context = head + tok.encode(TEXT)
    continuation = tok.encode("\n\nWho sails to Orm, and why?<|im_end|>\n<|im_start|>assistant\n"
                              "Ilsa the baker sails to Orm to buy flour from her grandfather's mill.")
    cache, queries = rq.context_prefill(model, context)
    full = model.log_probs(continuation, cache.copy())
    sink = 4
    budgets = [24, 40, 64] * model.config.num_layers  # ragged: one budget per (layer, KV head)
    with Client(args.server) as client:
        compact_cache(cache, client, queries, sink, len(context), per_head=budgets, method="am")
    compacted = model.log_probs(continuation, cache.copy())
    arrays = {"context": np.asarray(context), "continuation": np.asarray(continuation),
              "logical_length": np.asarray(cache.position), "logprobs_full": full, "logprobs_compacted": compacted}
    for l, heads in enumerate(cache.heads):
        for g, block in enumerate(heads):
            arrays[f"l{l}.h{g}.keys"] = block.keys
            arrays[f"l{l}.h{g}.values"] = block.values
            arrays[f"l{l}.h{g}.beta"] = block.bias
    np.savez_compressed(args.out, **arrays)
    lengths = sorted({len(h) for layer in cache.heads for h in layer})
    print(f"wrote {args.out}: context {len(context)} tokens, head lengths {lengths}, continuation {len(continuation)}; "
          f"mean log-prob full {full.mean():.4f}, compacted {compacted.mean():.4f}")


if __name__ == "__main__":
    main()
