"""Pass keys through kvcompact.hf: the real SmolLM2-135M-Instruct loaded by transformers (from its
GGUF file), a context compacted by `hf.answer` through a running service, the key looked for in
the greedy answer. The harness (kvcompact.eval.quality) runs the numpy runtime; this checks that
the HF integration's capture and cache give the same kind of result.

    python -m kvcompact.eval.hf_needles --server 127.0.0.1:50051 --data ../shared/data \\
        --ratios 10 20 --queries repeat-prefill+repeat-detail+detail-questions repeat-prefill
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from kvcompact import Client, hf
from kvcompact.eval.quality import QUESTION, data_dir, haystack
from kvcompact.runtime import LlamaModel
from kvcompact.runtime.llama import find_model_file


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--data", default=None, help="the shared data folder (default: beside the checkout)")
    ap.add_argument("--length", type=int, default=1024, help="haystack tokens")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--ratios", type=float, nargs="+", default=[10, 20])
    ap.add_argument("--queries", nargs="+", default=["repeat-prefill+repeat-detail+detail-questions", "repeat-prefill"],
                    help="kvcompact.hf query sources to compare (compact_ids' `queries`)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(find_model_file())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    runtime = LlamaModel()  # its tokenizer builds the haystack exactly as the harness does
    rng = np.random.default_rng(args.seed)
    found: dict[tuple[str, float], list[bool]] = {}
    start = time.time()
    with Client(args.server, streams=4) as client:
        for depth in args.depths:
            key = int(rng.integers(10000, 99999))
            doc = haystack(os.path.join(data_dir(args.data), "niah_essays"), args.length, depth, key, runtime)
            ids = hf.ChatFormat(tokenizer).context(doc) + hf.question_ids(tokenizer, QUESTION)
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)
            full = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
            found.setdefault(("full context", 1), []).append(str(key) in full)
            for queries in args.queries:
                for ratio in args.ratios:
                    text = hf.answer(model, tokenizer, doc, QUESTION, max_new_tokens=12, ratio=ratio, queries=queries,
                                     client=client)
                    found.setdefault((queries, ratio), []).append(str(key) in text)
                    print(f"depth {depth:g} {queries} {ratio:g}x: {text!r}", flush=True)
    print(f"\n{len(args.depths)} haystacks of {args.length} tokens, {time.time() - start:.0f} s")
    print("| queries | ratio | pass keys found |\n| --- | --- | --- |")
    for (queries, ratio), hits in found.items():
        print(f"| {queries} | {ratio:g}x | {sum(hits)} of {len(hits)} |")


if __name__ == "__main__":
    main()
