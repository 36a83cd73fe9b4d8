"""Budget profiles for Allocation.profile: how much the model loses when one head is compacted.

For each QuALITY article: the full-context model answers a few questions (its own answers are the
targets); every compactable (layer, KV head) is compacted through the service at each sweep ratio
(AM, self-study queries); then, one head at a time, only that head's block is swapped into the
full cache and the change in log-perplexity of the answers is recorded. A head's share is its mean
loss over the sweep (negative losses count as 0) plus a floor of `--floor` times the mean, so that
no head is starved. Writes the profile (BudgetProfile JSON, for the server's --profiles_dir) and
the sweep itself (every head's loss at every ratio).

    python -m kvcompact.eval.profile --server HOST:PORT --model smollm2 \\
        --out profiles/smollm2-135m-instruct.json --sweep-out docs/quality/profile-smollm2.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from kvcompact.client import Client
from kvcompact.eval.quality import SINK_TOKENS, answer_logprob, chat_prefix, chat_suffix, data_dir, prefill
from kvcompact.runtime import GemmaModel, LlamaModel
from kvcompact.runtime.compaction import compact_cache

PROFILE_NAMES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma-3-270m"}


def head_losses(model, client: Client, article: dict, args) -> dict[float, np.ndarray]:
    """{ratio: [layers x kv_heads] change in log-ppl when only that head is compacted}."""
    prefix = prefill(model, chat_prefix(model, article["input"], args.max_context), args.queries_per_head)
    questions = []
    for q in article["instructions"][: args.questions]:
        suffix = chat_suffix(model, q.strip())
        answer = model.generate(suffix, prefix.cache.copy(), max_new_tokens=args.answer_tokens)
        if len(answer) >= 2:
            questions.append((suffix, answer, answer_logprob(model, prefix.cache, suffix, answer)))
    if not questions:  # a mean over no answers would be NaN, and so would the profile
        raise ValueError(f"none of the first {args.questions} questions got an answer of at least 2 tokens; "
                         "raise --questions or --answer-tokens")
    layers = model.compactable_layers()
    queries = prefix.queries("self_study")
    out = {}
    for ratio in args.ratios:
        compacted = prefix.cache.copy()
        compact_cache(compacted, client, queries, SINK_TOKENS, len(prefix.tokens), layers=layers, ratio=ratio,
                      holdout=0.1, method="am")
        loss = np.zeros((len(layers), model.config.num_kv_heads))
        for i, l in enumerate(layers):
            for g in range(model.config.num_kv_heads):
                cache = prefix.cache.copy()
                cache.heads[l][g] = compacted.heads[l][g]
                loss[i, g] = np.mean([full - answer_logprob(model, cache, s, a) for s, a, full in questions])
        out[ratio] = loss
    return out


def shares_from_losses(losses: np.ndarray, floor: float) -> np.ndarray:
    """Mean loss per head (negatives as 0) plus floor x its mean, normalised to sum 1."""
    positive = np.maximum(losses, 0.0)
    shares = positive + floor * max(float(positive.mean()), 1e-9)
    return shares / shares.sum()


def write_profile(args, shares: np.ndarray, layers: list[int], kv_heads: int, model_name: str, how: str) -> None:
    profile = {"name": PROFILE_NAMES[args.model], "model": model_name, "numLayers": len(layers),
               "numKvHeads": kv_heads, "shares": [round(float(x), 6) for x in shares.ravel()], "method": how}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(profile, open(args.out, "w"), indent=1)
    print(f"wrote {args.out}: {shares.size} heads, most/least demanding share {shares.max() / shares.min():.1f}x")


def rebuild(args, argv_text: str) -> None:
    """A profile from a saved sweep (no model run): e.g. the same losses with another floor."""
    sweep = json.load(open(args.from_sweep))
    losses = np.mean([np.array(v) for v in sweep["loss_per_ratio"].values()], axis=0)
    names = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}
    write_profile(args, shares_from_losses(losses, args.floor), sweep["layers"], losses.shape[1], names[args.model],
                  f"python -m kvcompact.eval.profile {argv_text} ({time.strftime('%Y-%m-%d')}) from the sweep of "
                  f"`python -m kvcompact.eval.profile {sweep['argv']}`: mean change in log-ppl of the model's own "
                  f"answers when one head alone is AM-compacted at {sweep['args']['ratios']}x, QuALITY articles "
                  f"{sweep['args']['first_article']}-{sweep['args']['first_article'] + sweep['args']['articles'] - 1}; "
                  f"layers are the model's compactable layers {sweep['layers']} in order")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--model", choices=sorted(PROFILE_NAMES), default="smollm2")
    ap.add_argument("--out", required=True, help="the profile JSON (BudgetProfile)")
    ap.add_argument("--sweep-out", default=None, help="every head's loss at every ratio (JSON)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--first-article", type=int, default=10,
                    help="QuALITY articles from this one (the quality report uses 0-9: keep them apart)")
    ap.add_argument("--articles", type=int, default=3)
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--max-context", type=int, default=1536)
    ap.add_argument("--answer-tokens", type=int, default=40)
    ap.add_argument("--queries-per-head", type=int, default=2048)
    ap.add_argument("--ratios", type=float, nargs="+", default=[10, 50])
    ap.add_argument("--floor", type=float, default=0.5,
                    help="every head's share gets this times the mean loss (single-head losses are noisy)")
    ap.add_argument("--from-sweep", default=None, metavar="SWEEP_JSON",
                    help="rebuild the profile from an earlier --sweep-out (e.g. with another --floor); no model run")
    args = ap.parse_args(argv)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_sweep:
        rebuild(args, argv_text)
        return
    model = GemmaModel() if args.model == "gemma3" else LlamaModel()
    articles = [json.loads(l) for l in open(os.path.join(data_dir(args.data), "leval", "quality.jsonl"))]
    chosen = articles[args.first_article: args.first_article + args.articles]
    if not chosen:  # a profile from no article would be NaN
        raise SystemExit(f"the data has {len(articles)} articles; --first-article {args.first_article} leaves none")
    start = time.time()
    per_article = []
    with Client(args.server) as client:
        for i, article in enumerate(chosen):
            per_article.append(head_losses(model, client, article, args))
            print(f"article {args.first_article + i}: done ({time.time() - start:.0f} s)", flush=True)
    mean = {r: np.mean([a[r] for a in per_article], axis=0) for r in args.ratios}
    losses = np.mean([mean[r] for r in args.ratios], axis=0)
    shares = shares_from_losses(losses, args.floor)
    layers = model.compactable_layers()
    write_profile(args, shares, layers, model.config.num_kv_heads, model.name,
                  f"python -m kvcompact.eval.profile {argv_text} ({time.strftime('%Y-%m-%d')}): mean change in "
                  f"log-ppl of the model's own answers when one head alone is AM-compacted at {args.ratios}x, "
                  f"QuALITY articles {args.first_article}-{args.first_article + len(chosen) - 1}; "
                  f"layers are the model's compactable layers {layers} in order")
    if args.sweep_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.sweep_out)), exist_ok=True)
        json.dump({"args": vars(args), "argv": argv_text, "layers": layers, "wall_seconds": time.time() - start,
                   "loss_per_ratio": {str(r): mean[r].tolist() for r in args.ratios},
                   "per_article": [{str(r): a[r].tolist() for r in args.ratios} for a in per_article]},
                  open(args.sweep_out, "w"), indent=1)


if __name__ == "__main__":
    main()
