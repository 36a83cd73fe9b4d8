"""Would a detail survive selection? For a pass-key haystack of the quality harness, where the
key's tokens rank under each reference-query source, head by head, against the budget a ratio
leaves; and which heads the question itself reads the key from.

    python -m kvcompact.eval.probe --data ../shared/data --ratio 20 --sources repeat self_study question

Scores are computed here as the service computes them (softmax over the compacted span, RMS or max
over a source's queries); no server is needed. For each source it prints, over all (layer, KV
head), how many keep the whole key / any of it within the budget, and the key's ranks in the
heads whose question queries attend to it most.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from kvcompact.eval.quality import NEEDLE, QUESTION, SINK_TOKENS, chat_prefix, chat_suffix, data_dir, haystack, prefill
from kvcompact.runtime import LlamaModel


def span_positions(pieces: list[str], text: str) -> list[int]:
    """Positions of the tokens of every run of tokens (pieces: each token decoded) that spells
    `text`, spaces around it ignored."""
    out = []
    for i in range(len(pieces)):
        joined = ""
        for j in range(i, len(pieces)):
            joined += pieces[j]
            if joined.strip() == text and pieces[i].strip():
                out.extend(range(i, j + 1))
                break
            if len(joined.strip()) >= len(text) or not text.startswith(joined.strip()):
                break
    return out


def attention(queries: np.ndarray, keys: np.ndarray, scale: float) -> np.ndarray:
    logits = queries.astype(np.float64) @ keys.astype(np.float64).T * scale
    logits -= logits.max(axis=1, keepdims=True)
    a = np.exp(logits)
    return a / a.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="the shared data folder (default: beside the checkout)")
    ap.add_argument("--length", type=int, default=1024, help="haystack tokens")
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--key", type=int, default=48213)
    ap.add_argument("--ratio", type=float, default=20)
    ap.add_argument("--sources", nargs="+", default=["repeat", "self_study", "question"])
    ap.add_argument("--top-heads", type=int, default=6, help="heads listed, by the question's attention to the span")
    args = ap.parse_args(argv)

    model = LlamaModel()
    doc = haystack(os.path.join(data_dir(args.data), "niah_essays"), args.length, args.depth, args.key, model)
    prefix = prefill(model, chat_prefix(model, doc, args.length + 64), queries_per_head=1 << 30)
    prefix.question = chat_suffix(model, QUESTION)
    tokens = prefix.tokens
    pieces = [model.tokenizer.decode([t]) for t in tokens[SINK_TOKENS:]]
    span = span_positions(pieces, str(args.key))
    cfg = model.config
    scale = 1.0 / np.sqrt(cfg.head_dim)
    n = len(tokens) - SINK_TOKENS
    budget = max(1, round(n / args.ratio))
    print(f"needle {NEEDLE.format(key=args.key)!r} at depth {args.depth}: span positions {span}; "
          f"{n} tokens, budget {budget} per head at {args.ratio:g}x")
    heads = [(l, h) for l in range(cfg.num_layers) for h in range(cfg.num_kv_heads)]
    keys = {(l, h): prefix.cache.heads[l][h].keys[SINK_TOKENS:len(tokens)] for l, h in heads}
    group = cfg.num_heads // cfg.num_kv_heads
    question = prefix.queries("question")
    last = lambda q: q.reshape(group, -1, q.shape[-1])[:, -1]  # noqa: E731  (query-head major: the last token)
    question_mass = {(l, h): float(attention(last(question[l][h]), keys[(l, h)], scale)[:, span].sum(axis=1).mean())
                     for l, h in heads}
    top = sorted(question_mass, key=question_mass.get, reverse=True)[: args.top_heads]
    for name in args.sources:
        pool = prefix.queries(name)
        keep_all = keep_any = 0
        ranks = {}
        for l, h in heads:
            a = attention(pool[l][h], keys[(l, h)], scale)
            for reduce, score in (("rms", np.sqrt((a ** 2).mean(axis=0))), ("max", a.max(axis=0))):
                ranks[(l, h, reduce)] = np.argsort(np.argsort(-score, kind="stable"), kind="stable")[span]
            keep_all += int(np.all(ranks[(l, h, "rms")] < budget))
            keep_any += int(np.any(ranks[(l, h, "rms")] < budget))
        print(f"\n{name}: {pool[0].shape[1]} queries per KV head; RMS selection keeps the whole span in "
              f"{keep_all} of {len(heads)} heads, some of it in {keep_any}")
        for l, h in top:
            print(f"  layer {l:2d} head {h} (question's attention on the span {question_mass[(l, h)]:.3f}): span ranks "
                  f"rms {sorted(ranks[(l, h, 'rms')].tolist())}, max {sorted(ranks[(l, h, 'max')].tolist())}")


if __name__ == "__main__":
    main()
