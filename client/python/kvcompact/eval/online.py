"""Online (repeated) compaction: read a long text under a physical cache cap.

The model reads the text in chunks, teacher-forced. Whenever the next chunk would push the cache
past `--cap` entries per head, everything but the attention sinks and the most recent `--recent`
entries is compacted by `--ratio` (AM, through the service; blocks compacted before are sent with
their beta as the existing bias, so they are re-compacted with beta = log w + b). The same read with
StreamingLLM-style eviction to the same length, and without a cap, give the references.

    python -m kvcompact.eval.online --server HOST:PORT --tokens 8192 --cap 1024 --out DIR
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from kvcompact.client import Client
from kvcompact.eval.quality import data_dir
from kvcompact.runtime.cache import KVCache
from kvcompact.runtime.compaction import compact_cache
from kvcompact.runtime.llama import LlamaModel

SINKS = 4


@dataclass
class Read:
    policy: str
    nll: list[float] = field(default_factory=list)   # -log p of tokens 1..N-1
    compactions: int = 0
    compact_seconds: float = 0.0
    max_entries_per_head: int = 0
    entries_after: list[int] = field(default_factory=list)  # per head, after each compaction

    def mean_nll(self, start: int) -> float:
        """Mean over tokens start..N-1 (nll[i] is token i + 1)."""
        return float(np.mean(self.nll[start - 1:]))


def essay_tokens(model: LlamaModel, data: str, count: int) -> list[int]:
    """The first `count` tokens of the Paul Graham essays (the haystack text), BOS first."""
    text = ""
    for path in sorted(glob.glob(os.path.join(data, "niah_essays", "*.txt"))):
        text += open(path, encoding="utf-8").read() + "\n\n"
        if len(text) > count * 6:
            break
    tokens = model.tokenizer.encode(text)
    bos = model.tokenizer.bos_id
    return ([bos] if bos is not None else []) + tokens[: count - 1]


def head_length(cache: KVCache) -> int:
    return max(len(h) for layer in cache.heads for h in layer)


def make_room(cache: KVCache, read: Read, policy: str, recent: int, ratio: float, client: Client | None,
              queries: list[np.ndarray] | None) -> None:
    """Shrinks every head to SINKS + (span / ratio) + recent entries, span = the rest."""
    length = head_length(cache)
    start, end = SINKS, length - recent
    keep = max(1, int(round((end - start) / ratio)))
    t0 = time.time()
    if policy == "am":
        compact_cache(cache, client, queries, start, end, tokens=keep, holdout=0.1, method="am")
    elif policy == "streaming_llm":
        for layer in cache.heads:
            for g, h in enumerate(layer):
                idx = np.r_[0:start, end - keep:length]
                h.keys, h.values, h.bias = h.keys[idx], h.values[idx], h.bias[idx]
    read.compact_seconds += time.time() - t0
    read.compactions += 1
    read.entries_after.append(head_length(cache))


def read_text(model: LlamaModel, tokens: list[int], policy: str, cap: int, recent: int, chunk: int, ratio: float,
              client: Client | None, query_window: int, progress=None) -> Read:
    """Teacher-forced read of `tokens` under `policy` ("full", "am", "streaming_llm")."""
    read = Read(policy)
    cache = model.new_cache()
    window: list[list[np.ndarray]] = []  # per chunk, per layer [kv, group * n, d]
    group = model.config.num_heads // model.config.num_kv_heads
    last = None
    pos = 0
    while pos < len(tokens):
        n = min(chunk, len(tokens) - pos)
        if policy != "full" and head_length(cache) + n > cap:
            queries = None
            if policy == "am":
                # Reference queries: those of the most recent `query_window` tokens read (they
                # attend to the span being compacted), pooled per KV head.
                queries = [np.concatenate([w[l] for w in window], axis=1) for l in range(model.config.num_layers)]
                queries = [q[:, -query_window * group:] for q in queries]
            make_room(cache, read, policy, recent, ratio, client, queries)
        logits, captured = model.forward(tokens[pos:pos + n], cache, capture_queries=True)
        window.append(captured)
        while sum(w[0].shape[1] for w in window) - window[0][0].shape[1] >= query_window * group:
            window.pop(0)
        logits = logits.astype(np.float64)
        if last is not None:
            logits = np.concatenate([last[None], logits])
            targets = tokens[pos:pos + n]
        else:
            targets = tokens[1:n]
        use = logits[: len(targets)]
        use = use - use.max(axis=-1, keepdims=True)
        logp = use - np.log(np.exp(use).sum(axis=-1, keepdims=True))
        read.nll.extend((-logp[np.arange(len(targets)), targets]).tolist())
        last = logits[-1]
        read.max_entries_per_head = max(read.max_entries_per_head, head_length(cache))
        pos += n
        if progress:
            progress(policy, pos)
    return read


def report(reads: list[Read], args, wall: float) -> str:
    full = next(r for r in reads if r.policy == "full")
    lines = [
        "# Online compaction: a long text read under a cache cap",
        "",
        f"SmolLM2-135M-Instruct reads {args.tokens} tokens of the Paul Graham essays, teacher-forced, in chunks of "
        f"{args.chunk}. Cap: {args.cap} entries per (layer, KV head); on reaching it, everything but {SINKS} sink "
        f"entries and the last {args.recent} is shrunk by {args.ratio}x. Mean NLL (log-perplexity, nats/token) over "
        f"the tokens read after the cap was first reached (from token {args.cap}) and over the whole text.",
        "",
        "| policy | compactions | max entries/head | NLL after cap | vs uncapped | NLL whole text | compaction s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = full.mean_nll(args.cap)
    for r in reads:
        after = r.mean_nll(args.cap)
        lines.append(f"| {r.policy} | {r.compactions} | {r.max_entries_per_head} | {after:.4f} | "
                     f"{100 * (after - base) / base:+.2f}% | {r.mean_nll(1):.4f} | {r.compact_seconds:.1f} |")
    lines += ["", f"Command: `python -m kvcompact.eval.online {' '.join(args.argv)}` "
              f"({platform.machine()}, {os.cpu_count()} cores, {wall / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--out", default="online-report")
    ap.add_argument("--data", default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--cap", type=int, default=1024)
    ap.add_argument("--recent", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--query-window", type=int, default=512, help="tokens whose queries AM fits to")
    ap.add_argument("--policies", nargs="+", default=["full", "am", "streaming_llm"])
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.cap <= args.recent + SINKS + args.chunk:
        ap.error("--cap must exceed --recent + sinks + --chunk")
    os.makedirs(args.out, exist_ok=True)
    model = LlamaModel()
    tokens = essay_tokens(model, data_dir(args.data), args.tokens)
    client = Client(args.server)
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(args.policies) * len(tokens), unit="tok")
    except ImportError:  # progress is optional
        bar = None
    done = {}

    def progress(policy, pos):
        if bar is not None:
            bar.update(pos - done.get(policy, 0))
            bar.set_description(policy)
        done[policy] = pos

    start = time.time()
    reads = [read_text(model, tokens, p, args.cap, args.recent, args.chunk, args.ratio, client, args.query_window,
                       progress) for p in args.policies]
    if bar is not None:
        bar.close()
    wall = time.time() - start
    json.dump({"args": vars(args), "wall_seconds": wall, "reads": [asdict(r) for r in reads]},
              open(os.path.join(args.out, "online.json"), "w"))
    text = report(reads, args, wall)
    open(os.path.join(args.out, "online.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
