"""Checks the numpy runtime against a real engine: loads the same GGUF file with HF transformers
(which dequantizes it and runs its own Llama / Gemma-3 implementation) and compares the logits of
both on the same token ids. For Gemma-3 a prompt longer than the 512-token sliding window is
included, and the tokenizers' ids are compared too. Needs torch, transformers and gguf; prints a
table and a JSON line.

    python compare_with_transformers.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--device cuda]
    python compare_with_transformers.py --gguf gemma-3-270m-q4_k_m.gguf [--device cuda]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvcompact.runtime.gemma import GemmaModel  # noqa: E402
from kvcompact.runtime.llama import LlamaModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text", default="")
    args = ap.parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import gguf

    arch = gguf.GGUFReader(args.gguf).fields["general.architecture"].contents()
    ours = GemmaModel(args.gguf) if arch == "gemma3" else LlamaModel(args.gguf)
    tok = ours.tokenizer
    text = args.text or ("Attention Matching compacts a key-value cache by choosing a few keys, fitting a bias "
                         "per key and refitting the values, so that attention outputs and mass are preserved.")
    prompts = {
        "chat": tok.encode(tok.apply_chat_template([{"role": "user", "content": text}])),
        "plain": tok.encode(text + " " + text.lower()),
    }
    if arch == "gemma3":
        prompts["long (700)"] = (tok.encode("<bos>" + (text + " ") * 40))[:700]
    folder, name = os.path.split(os.path.abspath(args.gguf))
    t0 = time.time()
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).to(args.device).eval()
    load_s = time.time() - t0
    rows = []
    for label, ids in prompts.items():
        with torch.no_grad():
            ref = hf(torch.tensor([ids], device=args.device)).logits[0].float().cpu().numpy()
        got = ours.forward(ids, ours.new_cache())
        diff = np.abs(got - ref)
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        lsm = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
        lp_diff = float(np.abs(lsm(got.astype(np.float64)) - lsm(ref.astype(np.float64))).max())
        top1 = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
        rows.append({"prompt": label, "tokens": len(ids), "max_abs_logit_diff": float(diff.max()),
                     "rel_l2": rel, "max_abs_logprob_diff": lp_diff, "top1_agreement": top1})
    token_check = ""
    try:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        sample = text + " Ünïcödé, 42 apples\n\n  end."
        theirs_ids = hf_tok.encode(sample, add_special_tokens=False)
        ours_ids = tok.encode(sample)
        token_check = f"; tokenizer ids {'identical' if theirs_ids == ours_ids else 'DIFFER'} on a sample ({len(ours_ids)} ours, {len(theirs_ids)} theirs)"
        rows.append({"prompt": "tokenizer sample", "ours": ours_ids, "theirs": theirs_ids})
    except Exception as e:  # noqa: BLE001 - the logits check stands on its own
        token_check = f"; tokenizer not compared ({type(e).__name__}: {e})"
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {args.device}, "
          f"{arch}, GGUF load {load_s:.1f} s{token_check}")
    print(f"{'prompt':8s} {'tokens':>6s} {'max|dlogit|':>12s} {'rel L2':>10s} {'max|dlogp|':>11s} {'top-1 agree':>11s}")
    for r in rows:
        if "tokens" not in r:
            continue
        print(f"{r['prompt']:8s} {r['tokens']:6d} {r['max_abs_logit_diff']:12.2e} {r['rel_l2']:10.2e} "
              f"{r['max_abs_logprob_diff']:11.2e} {r['top1_agreement']:11.3f}")
    print(json.dumps({"check": "runtime-vs-transformers", "rows": rows}))


if __name__ == "__main__":
    main()
