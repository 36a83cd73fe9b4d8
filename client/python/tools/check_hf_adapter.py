"""Checks the transformers adapter (kvcompact.hf) on the GGUF model transformers loads itself:
1. an uncompacted cache through the adapter gives HF's own (sdpa) log-probs;
2. the compacted cache of tools/make_adapter_fixture.py (ragged heads, beta, logical positions)
   gives the numpy runtime's log-probs on the same blocks, and so does the full cache.
Needs torch, transformers and gguf. Prints a table and a JSON line.

    python check_hf_adapter.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --fixture adapter_fixture.npz [--device cuda]
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvcompact import hf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    fx = np.load(args.fixture)
    context, continuation = fx["context"].tolist(), fx["continuation"].tolist()
    folder, name = os.path.split(os.path.abspath(args.gguf))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).to(args.device).eval()
    c = model.config

    # HF's own log-probs of the continuation after the full context (its default attention).
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation], device=args.device)).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    n0 = len(context)
    hf_plain = np.array([logp[n0 - 1 + i, continuation[i]].item() for i in range(1, len(continuation))])

    hf.enable(model)
    cache = hf.CompactedCache.empty(model, device=args.device)
    hf.forward(model, cache, context)
    adapter_full = hf.log_probs(model, cache, continuation)

    blocks = [[(fx[f"l{l}.h{g}.keys"], fx[f"l{l}.h{g}.values"], fx[f"l{l}.h{g}.beta"])
               for g in range(c.num_key_value_heads)] for l in range(c.num_hidden_layers)]
    compacted = hf.CompactedCache.from_blocks(blocks, int(fx["logical_length"]), device=args.device, interleaved_rope=True)
    adapter_compacted = hf.log_probs(model, compacted, continuation)

    rows = [
        ("adapter, full cache vs HF sdpa", adapter_full, hf_plain),
        ("adapter, full cache vs numpy runtime", adapter_full, fx["logprobs_full"]),
        ("adapter, compacted vs numpy runtime", adapter_compacted, fx["logprobs_compacted"]),
    ]
    lengths = sorted({len(fx[f"l{l}.h{g}.beta"]) for l in range(c.num_hidden_layers) for g in range(c.num_key_value_heads)})
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {args.device}; context {n0} "
          f"tokens, compacted head lengths {lengths}, continuation {len(continuation)} tokens")
    print(f"{'comparison':40s} {'max|dlogp|':>11s} {'mean logp':>10s} {'reference':>10s}")
    out = []
    for label, got, want in rows:
        diff = float(np.abs(got - want).max())
        print(f"{label:40s} {diff:11.2e} {got.mean():10.4f} {want.mean():10.4f}")
        out.append({"comparison": label, "max_abs_logprob_diff": diff, "mean": float(got.mean()), "reference_mean": float(want.mean())})
    print(json.dumps({"check": "hf-adapter", "rows": out}))


if __name__ == "__main__":
    main()
