"""Retrieval heads: which (layer, KV head) copies a detail out of the context.

The model reads lists of random records written here (words and numbers that mean nothing, so
nothing but the context can supply them), is asked to copy one record back, and the right record
is teacher-forced as its answer. For every token of the record's value (after its key, which
the question itself holds), each head's attention weight on that token's place in the context
(from the query that predicts it, averaged over the query heads of the KV head) is recorded; a
head's retrieval score is its mean over the copied tokens. Heads that score high are the ones a later question about a detail reads through (Wu et
al., "Retrieval Head Mechanistically Explains Long-Context Factuality", 2024). Writes a budget
profile (shares = score + floor x mean score) for the server's --profiles_dir:

    python -m kvcompact.eval.retrieval_heads --model smollm2 --out /tmp/profiles/smollm2-retrieval.json
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from kvcompact.eval.profile import PROFILE_NAMES
from kvcompact.eval.quality import chat_prefix, chat_suffix
from kvcompact.runtime import GemmaModel, LlamaModel
from kvcompact.runtime import queries as rq

WORDS = ["amber", "basin", "cedar", "delta", "ember", "fable", "grove", "harbor", "ivory", "jasper", "kettle",
         "lantern", "meadow", "nickel", "orchid", "pepper", "quartz", "ribbon", "saddle", "timber", "umbra",
         "velvet", "willow", "yarrow", "zephyr", "anchor", "bramble", "cobalt", "dune", "falcon", "garnet", "hollow",
         "indigo", "juniper", "kelp", "linen", "marble", "nectar", "onyx", "pebble", "quill", "russet", "sable",
         "thistle", "tundra", "vesper", "walnut", "cinder", "mosaic", "prairie"]


def make_records(rng: np.random.Generator, count: int) -> list[str]:
    """Records '<word>-<word>: <number> <word>' with distinct keys."""
    keys = set()
    out = []
    while len(out) < count:
        key = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        if key in keys:
            continue
        keys.add(key)
        out.append(f"{key}: {int(rng.integers(100, 99999))} {rng.choice(WORDS)}")
    return out


def head_scores(model, records: list[str], asked: int) -> tuple[np.ndarray, int]:
    """[layers, kv_heads] summed attention on the source of each copied token, and their count."""
    cfg = model.config
    tok = model.tokenizer
    layers = model.compactable_layers()
    prefix = chat_prefix(model, "\n".join(records), 10 ** 6)
    cache, _ = rq.context_prefill(model, prefix)
    key = records[asked].split(":")[0]
    suffix = chat_suffix(model, f"Copy the record that starts with {key}.")
    answer = tok.encode(records[asked])
    seq = suffix + answer
    c = cache.copy()
    _, queries = model.forward(seq, c, capture_queries=True)
    # Copied tokens: the record's value (after "<key>:", which the question itself holds), each
    # with its source, found where the record's tokens sit in the context.
    body = answer[1:]  # the first token may be split differently after a newline
    start = next((p for p in range(len(prefix) - len(body) + 1) if prefix[p:p + len(body)] == body), None)
    if start is None:
        return np.zeros((len(layers), cfg.num_kv_heads)), 0
    first_value = len(tok.encode(key + ":"))
    steps = [(len(suffix) + i - 1, start + i - 1) for i in range(max(1, first_value), len(answer))]
    group = cfg.num_heads // cfg.num_kv_heads
    scores = np.zeros((len(layers), cfg.num_kv_heads))
    for li, l in enumerate(layers):
        for g in range(cfg.num_kv_heads):
            block = c.heads[l][g]
            q = queries[l][g].reshape(group, len(seq), -1)
            for j, source in steps:
                visible = len(prefix) + j + 1  # the query at j sees the context and seq[:j + 1]
                logits = model.scale * q[:, j] @ block.keys[:visible].T + block.bias[:visible]
                logits -= logits.max(axis=1, keepdims=True)
                w = np.exp(logits)
                scores[li, g] += float(np.mean(w[:, source] / w.sum(axis=1)))
    return scores, len(steps)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--out", required=True, help="the profile (BudgetProfile JSON)")
    ap.add_argument("--name", default="", help="the profile's name (default: <model>-retrieval)")
    ap.add_argument("--documents", type=int, default=6)
    ap.add_argument("--records", type=int, default=40, help="records per document")
    ap.add_argument("--floor", type=float, default=0.5, help="added to every head's score, times the mean score")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = GemmaModel() if args.model == "gemma3" else LlamaModel()
    rng = np.random.default_rng(args.seed)
    total, copied = None, 0
    for _ in range(args.documents):
        records = make_records(rng, args.records)
        s, n = head_scores(model, records, int(rng.integers(len(records))))
        total = s if total is None else total + s
        copied += n
    score = total / max(copied, 1)
    shares = score + args.floor * score.mean()
    shares = shares / shares.sum()
    order = np.argsort(-score, axis=None)[:8]
    layers = model.compactable_layers()
    print(f"{copied} copied tokens; top heads (layer, kv head, score): " +
          ", ".join(f"({layers[i // score.shape[1]]}, {i % score.shape[1]}, {score.flat[i]:.2f})" for i in order))
    name = args.name or PROFILE_NAMES[args.model] + "-retrieval"
    command = "python -m kvcompact.eval.retrieval_heads " + " ".join(argv if argv is not None else sys.argv[1:])
    profile = {"name": name, "model": model.name, "numLayers": len(layers), "numKvHeads": score.shape[1],
               "shares": [round(float(x), 6) for x in shares.ravel()],
               "method": f"{command}: retrieval scores (row-major, layers x KV heads) " +
                         " ".join(f"{x:.3f}" for x in score.ravel())}
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)


if __name__ == "__main__":
    main()
