"""Compacts a real model's KV cache through a running kvcompact server and shows what it does:

    python -m kvcompact.demo --server localhost:50051 [--ratio 5]

SmolLM2-135M-Instruct (numpy runtime, GGUF from PyPI) reads a short embedded text; its cache is
compacted by Attention Matching (self-study reference queries) and by the H2O-like baseline at
the same budget; for each question the model answers from the full and from each compacted cache,
and the change in log-probability of the full-context answer is printed with the cache sizes.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from kvcompact import Client
from kvcompact.runtime import LlamaModel
from kvcompact.runtime import queries as rq
from kvcompact.runtime.compaction import compact_cache

CONTEXT = """\
The harbour town of Ness sits at the mouth of the river Tay-Orm, where three stone bridges cross the \
water: the Low Bridge, built in 1712 by the mason Aldous Crane; the Chain Bridge, opened in 1861 and \
painted a deep red every spring; and the New Bridge, finished in 1998 after eleven years of argument \
in the town council. A green lighthouse stands on the northern breakwater. Its lamp was first lit on \
the night of 3 March 1874 by the keeper Margit Olsen, who kept it for forty-one years and never once \
let it go dark.

Ness is known for two things besides its bridges. The first is the bakery of Ilsa Brandt on Quay \
Street, which opens at five every morning except on the first Sunday of each month, when Ilsa sails \
to the island of Orm to buy flour from the mill her grandfather built. Her rye loaf, baked with \
caraway and a spoon of dark honey, won the county fair eight years in a row. The second is the \
autumn regatta, held on the last Saturday of September, in which crews of six row from the Low \
Bridge to the lighthouse and back, a course of 4.2 kilometres. The record, 14 minutes and 9 seconds, \
was set in 2019 by a crew of fishermen from the village of Kell.

The town has 6,300 inhabitants. Its school, named after Margit Olsen, teaches 410 pupils. The ferry \
to Orm leaves twice a day, at 7:15 and at 16:40, and takes fifty minutes in calm weather. Visitors \
are told to try the smoked herring at the harbour market on Thursdays and to climb the 112 steps of \
the lighthouse, which has been a museum since the lamp was automated in 1986."""

QUESTIONS = [
    "Who first lit the lighthouse lamp, and when?",
    "Why does the bakery close on the first Sunday of the month?",
    "What is the regatta record and who set it?",
    "When does the ferry to Orm leave?",
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--ratio", type=float, default=5)
    ap.add_argument("--answer-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    t0 = time.time()
    model = LlamaModel()
    tok = model.tokenizer
    head = tok.encode(tok.apply_chat_template([{"role": "user", "content": "@@"}], add_generation_prompt=False).split("@@")[0])
    tokens = head + tok.encode(CONTEXT)
    sink = 4
    cache, context_queries = rq.context_prefill(model, tokens)
    print(f"SmolLM2-135M-Instruct loaded and {len(tokens)} context tokens prefilled in {time.time() - t0:.1f} s")
    t0 = time.time()
    queries = rq.subsample(rq.self_study(model, cache), 2048, np.random.default_rng(0))
    print(f"self-study reference queries: {queries[0].shape[1]} per KV head in {time.time() - t0:.1f} s")

    caches = {"full": (cache, float("nan"), 0.0)}
    with Client(args.server) as client:
        # H2O scores keys with the context's own prefill attention, as it is defined.
        h2o_queries = rq.subsample(context_queries, 2048, np.random.default_rng(0))
        for label, method, q in (("AM", "am", queries), ("H2O-like", "h2o", h2o_queries)):
            c = cache.copy()
            t0 = time.time()
            result = compact_cache(c, client, q, sink, len(tokens), ratio=args.ratio, method=method, holdout=0.1)
            errors = [h.output_rel_error for l in result.layers.values() for h in l.heads if h.output_rel_error is not None]
            caches[label] = (c, float(np.mean(errors)), time.time() - t0)

    print(f"\ncache entries (all 30 layers x 3 KV heads): " +
          ", ".join(f"{k} {c.entries():,}" for k, (c, _, _) in caches.items()) + f"  (ratio {args.ratio:g}x)")
    print("held-out attention-output error reported by the service: " +
          ", ".join(f"{k} {e:.3f} ({s:.1f} s)" for k, (_, e, s) in caches.items() if k != "full"))
    deltas = {k: [] for k in caches if k != "full"}
    for question in QUESTIONS:
        suffix = tok.encode("\n\n" + question + model.reply_prefix)
        answer = model.generate(suffix, cache.copy(), max_new_tokens=args.answer_tokens)
        full_lp = float(model.log_probs(suffix + answer, cache.copy())[len(suffix) - 1:].mean())
        print(f"\nQ: {question}\n  full      : {tok.decode(answer).strip()}")
        for label, (c, _, _) in caches.items():
            if label == "full":
                continue
            out = tok.decode(model.generate(suffix, c.copy(), max_new_tokens=args.answer_tokens)).strip()
            lp = float(model.log_probs(suffix + answer, c.copy())[len(suffix) - 1:].mean())
            deltas[label].append(full_lp - lp)
            print(f"  {label:10s}: {out}")
    print("\nchange in log-perplexity of the full-context answers (nats per token, lower is better): " +
          ", ".join(f"{k} {np.mean(v):+.3f}" for k, v in deltas.items()))


if __name__ == "__main__":
    main()
