"""Quality of compacted caches inside a real model (SmolLM2-135M-Instruct, or Gemma-3-270M with
--model gemma3: only its global layers are compacted), one command:

    python -m kvcompact.eval.quality --server localhost:50051 --out docs/quality

For every method (AM and the baselines the service serves, plus full context and no context) and
ratio: the change in log-perplexity of the full-context model's own answers to QuALITY questions
(`leval/quality.jsonl`), pass-key retrieval in haystacks built from `niah_essays/`, the held-out
attention-output error the service reports, and compaction time. Writes results.json, report.md
and PNG plots into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from kvcompact import Client
from kvcompact.runtime import GemmaModel, KVCache, LlamaModel
from kvcompact.runtime import queries as rq
from kvcompact.client import detail_positions, number_positions, ratio_budget
from kvcompact.runtime.compaction import compact_cache

SINK_TOKENS = 4  # the start of the chat template stays exact (attention sinks)


@dataclass
class Row:
    task: str
    item: str
    method: str
    ratio: float
    value: float            # delta log-ppl (quality) or 1/0 correct (needle)
    attn_error: float = float("nan")
    compact_seconds: float = 0.0
    entries: int = 0        # stored cache entries after compaction (all layers and heads)
    capture_seconds: float = 0.0  # capturing this method's reference queries (0: context-prefill, free)


@dataclass
class Prefix:
    """A prefilled context and its reference-query pools, captured on first use per source."""
    model: LlamaModel
    tokens: list[int]
    cache: KVCache
    queries_per_head: int
    pools: dict = field(default_factory=dict)  # source -> per-layer [kv, m, d]
    capture_seconds: dict = field(default_factory=dict)  # source -> seconds it took to capture
    question: Optional[list[int]] = None  # the one question asked of this context (needles), if known
    surprisal: Optional[np.ndarray] = None  # per token, from the context's prefill

    def queries(self, source: str) -> list[np.ndarray]:
        """Queries from `source` ('context', 'repeat', 'self_study', 'question', or several joined
        by '+'), subsampled to queries_per_head with a fixed seed (every method sees the same set).
        'question' is query-aware compaction: the queries of the question itself, read after the
        context (known only where one question is asked of a context: the needle task)."""
        parts = []
        for name in source.split("+"):
            if name not in self.pools:
                start = time.time()
                span = self.tokens[SINK_TOKENS:]
                if name == "repeat":
                    self.pools[name] = rq.repeat_prefill(self.model, self.cache, span)
                elif name.startswith("repeat_detail"):  # repeat_detail or repeat_detail@0.1 (share)
                    share = float(name.split("@")[1]) if "@" in name else 0.25
                    if "repeat" not in self.pools:
                        self.pools["repeat"] = rq.repeat_prefill(self.model, self.cache, span)
                    positions = detail_positions(self.surprisal[SINK_TOKENS:], share)
                    self.pools[name] = rq.select_positions(self.pools["repeat"], len(span), positions,
                                                           self.model.config.num_heads // self.model.config.num_kv_heads)
                elif name == "self_study":
                    self.pools[name] = rq.self_study(self.model, self.cache)
                elif name.startswith(("detail_questions", "detail_spans")):  # ...@8 (count)
                    count = int(name.split("@")[1]) if "@" in name else 8
                    self.pools[name] = rq.detail_questions(self.model, self.cache, self.tokens, self.surprisal, count,
                                                           start=SINK_TOKENS, spans=name.startswith("detail_spans"))
                elif name == "question":
                    if not self.question:
                        raise ValueError("'question' queries exist only where the question is known before compaction "
                                         "(the needle task)")
                    _, self.pools[name] = self.model.forward(self.question, self.cache.copy(), capture_queries=True)
                else:
                    raise ValueError(f"unknown query source {name!r} (context, repeat, repeat_detail[@share], "
                                     "self_study, detail_questions[@count], detail_spans[@count], question)")
                self.capture_seconds[name] = time.time() - start
            parts.append(self.pools[name])
        return rq.subsample(rq.combine(*parts), self.queries_per_head, np.random.default_rng(0))


def data_dir(arg: str | None) -> str:
    """--data, else $KVCOMPACT_DATA_DIR, else a shared/data folder beside the working directory or
    one of its parents (the checkout's layout)."""
    if arg or os.environ.get("KVCOMPACT_DATA_DIR"):
        return arg or os.environ["KVCOMPACT_DATA_DIR"]
    here = os.getcwd()
    for _ in range(5):
        candidate = os.path.join(os.path.dirname(here), "shared", "data")
        if os.path.isdir(candidate):
            return candidate
        here = os.path.dirname(here)
    raise FileNotFoundError("shared data folder not found: pass --data or set KVCOMPACT_DATA_DIR")


def chat_prefix(model: LlamaModel, document: str, max_tokens: int) -> list[int]:
    """Tokens of the chat template up to and including the document, the document trimmed so the
    prefix fits max_tokens. The question follows in `chat_suffix`."""
    tok = model.tokenizer
    full = tok.apply_chat_template([{"role": "user", "content": "@@DOC@@"}], add_generation_prompt=False)
    head = tok.encode(full.split("@@DOC@@")[0])
    doc = tok.encode(document)[: max_tokens - len(head)]
    return head + doc


def chat_suffix(model: LlamaModel, question: str) -> list[int]:
    return model.tokenizer.encode("\n\n" + question + model.reply_prefix)


def prefill(model: LlamaModel, tokens: list[int], queries_per_head: int) -> Prefix:
    cache, queries, surprisal = rq.context_prefill(model, tokens, surprisal=True)
    return Prefix(model, tokens, cache, queries_per_head, {"context": queries}, surprisal=surprisal)


def answer_logprob(model: LlamaModel, cache: KVCache, suffix: list[int], answer: list[int]) -> float:
    """Mean log p(answer | cache, suffix), teacher-forced."""
    c = cache.copy()
    seq = suffix + answer
    lp = model.log_probs(seq, c)
    return float(lp[len(suffix) - 1:].mean())


def method_options(label: str) -> dict:
    """'am' or 'am:ridge=1e-3' -> client options. Applied on this side: 'queries=repeat' (the
    reference-query source, see Prefix.queries) and 'copy_values=1' (the service's keys and beta
    are kept and the original values of the kept tokens put back: an ablation that separates the
    mass fit from the value fit)."""
    name, _, rest = label.partition(":")
    options = {"method": name}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        options[key] = value if key in ("score", "queries", "allocation", "profile", "protect") else float(value)
    return options


def protected_positions(prefix: Prefix, kind: str, budget: int, share: float, before: int = 0,
                        after: int = 0) -> np.ndarray:
    """Context positions kept exact by 'protect=numbers' (kvcompact.client.number_positions, after
    the attention sinks)."""
    if kind != "numbers":
        raise ValueError(f"protect={kind!r}: only 'numbers' is defined")
    tok = prefix.model.tokenizer
    pieces = [tok.decode([t]) for t in prefix.tokens]
    return number_positions(pieces, budget, surprisal=prefix.surprisal, share=share, before=before, start=SINK_TOKENS,
                            after=after)


def default_queries(method: str) -> str:
    """AM fits repeat-prefill plus self-study queries unless told otherwise: the one source that
    beat the best eviction baseline on both QuALITY answers and dense facts at every ratio from 5x
    to 50x (docs/QUALITY.md); the baselines keep the prefill attention that defines them."""
    return "repeat+self_study" if method.startswith("am") else "context"


SUMMARY_PROMPT = "Summarize the text above in at most {words} words, keeping names, numbers and facts."


def summarized(prefix: Prefix, ratio: float, max_context: int) -> tuple[KVCache, float]:
    """The text-summarization baseline: the model summarises the context in about len/ratio tokens
    (greedy), and a fresh prefill of the chat template around the summary replaces the context."""
    model = prefix.model
    start = time.time()
    budget = max(8, int((len(prefix.tokens) - SINK_TOKENS) / ratio))
    prompt = rq.instruction_tokens(model, SUMMARY_PROMPT.format(words=max(5, int(budget * 0.75))))
    summary = model.tokenizer.decode(model.generate(prompt, prefix.cache.copy(), max_new_tokens=budget))
    cache, _ = rq.context_prefill(model, chat_prefix(model, summary, max_context))
    return cache, time.time() - start


def compacted(prefix: Prefix, client: Client, method: str, ratio: float, max_context: int = 0
              ) -> tuple[KVCache, float, float, float]:
    """The cache with the context compacted by `method` at `ratio`; seconds the compaction took,
    mean held-out attention error the service reported, seconds spent capturing queries."""
    if method == "summary":
        cache, seconds = summarized(prefix, ratio, max_context or len(prefix.tokens))
        return cache, seconds, float("nan"), 0.0
    cache = prefix.cache.copy()
    options = method_options(method)
    copy_values = bool(options.pop("copy_values", 0))
    protect, share = options.pop("protect", None), float(options.pop("protect_share", 0.5))
    before = int(options.pop("protect_before", 0))
    after = int(options.pop("protect_after", 0))
    source = options.pop("queries", default_queries(options["method"]))
    queries = prefix.queries(source)  # capture stays out of the compaction timing
    capture = sum(prefix.capture_seconds.get(name, 0.0) for name in source.split("+"))
    start = time.time()
    layers = prefix.model.compactable_layers()
    budget = ratio_budget(len(prefix.tokens) - SINK_TOKENS, ratio)
    kept = protected_positions(prefix, protect, budget, share, before, after) if protect else None
    result = compact_cache(cache, client, queries, SINK_TOKENS, len(prefix.tokens), layers=layers, ratio=ratio,
                           holdout=0.1, return_indices=True, protected=kept,
                           **options)
    if copy_values:
        for i, layer in result.layers.items():
            l = layers[i]
            for g, head in enumerate(layer.heads):
                original = prefix.cache.heads[l][g].values[SINK_TOKENS:len(prefix.tokens)]
                block = cache.heads[l][g]
                block.values[SINK_TOKENS:SINK_TOKENS + len(head.indices)] = original[head.indices]
    errors = [h.output_rel_error for l in result.layers.values() for h in l.heads if h.output_rel_error is not None]
    return cache, time.time() - start, float(np.mean(errors)) if errors else float("nan"), capture


def run_quality(model, client, args, rng, rows: list[Row], progress) -> None:
    articles = [json.loads(l) for l in open(os.path.join(data_dir(args.data), "leval", "quality.jsonl"))]
    for a_index, article in enumerate(articles[args.first_article: args.first_article + args.articles], args.first_article):
        prefix = prefill(model, chat_prefix(model, article["input"], args.max_context), args.queries_per_head)
        empty = prefill(model, chat_prefix(model, "", args.max_context), args.queries_per_head)
        questions = []
        for q in article["instructions"][: args.questions]:
            suffix = chat_suffix(model, q.strip())
            c = prefix.cache.copy()
            answer = model.generate(suffix, c, max_new_tokens=args.answer_tokens)
            if len(answer) >= 2:
                questions.append((suffix, answer, answer_logprob(model, prefix.cache, suffix, answer)))
        item = f"quality[{a_index}] ({len(prefix.tokens)} tokens, {len(questions)} questions)"
        for suffix, answer, full in questions:
            rows.append(Row("quality", item, "no_context", 0, full - answer_logprob(model, empty.cache, suffix, answer)))
        for method in args.methods:
            for ratio in args.ratios:
                cache, secs, err, capture = compacted(prefix, client, method, ratio, args.max_context)
                for suffix, answer, full in questions:
                    rows.append(Row("quality", item, method, ratio, full - answer_logprob(model, cache, suffix, answer),
                                    err, secs, cache.entries(), capture))
                progress(f"quality article {a_index} {method} {ratio}x")


def candidate_logprobs(model, cache: KVCache, suffix: list[int], candidates: list[str]) -> np.ndarray:
    """Summed log p(candidate tokens | cache, suffix) for each candidate (the suffix read once)."""
    c = cache.copy()
    last = model.forward(suffix, c)[-1].astype(np.float64)
    first = last - last.max() - np.log(np.exp(last - last.max()).sum())
    out = []
    for text in candidates:
        toks = model.tokenizer.encode(" " + text)
        lp = first[toks[0]]
        if len(toks) > 1:
            lp += float(model.log_probs(toks, c.copy()).sum())
        out.append(lp)
    return np.array(out)


def run_facts(model, client, args, rng, rows: list[Row], progress) -> None:
    """Dense-fact retrieval (kvcompact.eval.facts): per item, whether the right candidate ranks first
    (task 'facts') and the loss in its summed log-probability against the full context (task
    'facts_logp', nats; 0 is lossless)."""
    from kvcompact.eval import facts

    count = lambda text: len(model.tokenizer.encode(text))  # noqa: E731
    for length in args.facts_lengths:
        for family in args.facts_families:
            for k in range(args.facts):
                item = facts.make_item(args.seed * 1000 + k, family, length, count)
                prefix = prefill(model, chat_prefix(model, item.document, length + 64), args.queries_per_head)
                suffix = chat_suffix(model, item.question) + model.tokenizer.encode(item.lead)
                prefix.question = suffix
                empty = prefill(model, chat_prefix(model, "", length + 64), args.queries_per_head)
                name = f"facts {family} len={len(prefix.tokens)} #{k} depth={item.depth:.2f}"
                full = candidate_logprobs(model, prefix.cache, suffix, item.candidates)

                def record(method: str, ratio: float, lp: np.ndarray, *extra) -> None:
                    rows.append(Row("facts", name, method, ratio, float(np.argmax(lp) == 0), *extra))
                    rows.append(Row("facts_logp", name, method, ratio, float(full[0] - lp[0]), *extra))

                record("full", 1, full, float("nan"), 0.0, prefix.cache.entries())
                record("no_context", 0, candidate_logprobs(model, empty.cache, suffix, item.candidates))
                for method in args.methods:
                    for ratio in args.ratios:
                        cache, secs, err, capture = compacted(prefix, client, method, ratio, length + 64)
                        record(method, ratio, candidate_logprobs(model, cache, suffix, item.candidates), err, secs,
                               cache.entries(), capture)
                        progress(f"facts {family} {k} {method} {ratio}x")


NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."


def haystack(folder: str, length_tokens: int, depth: float, key: int, model: LlamaModel) -> str:
    text = ""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            text += open(os.path.join(folder, name)).read() + "\n"
        if len(text) > length_tokens * 6:
            break
    ids = model.tokenizer.encode(text)[:length_tokens]
    cut = int(len(ids) * depth)
    return model.tokenizer.decode(ids[:cut]) + " " + NEEDLE.format(key=key) + " " + model.tokenizer.decode(ids[cut:])


def run_needles(model, client, args, rng, rows: list[Row], progress) -> None:
    for length in args.needle_lengths:
        for depth in args.needle_depths:
            key = int(rng.integers(10000, 99999))
            doc = haystack(os.path.join(data_dir(args.data), "niah_essays"), length, depth, key, model)
            prefix = prefill(model, chat_prefix(model, doc, length + 64), args.queries_per_head)
            suffix = chat_suffix(model, QUESTION)
            prefix.question = suffix
            item = f"needle len={len(prefix.tokens)} depth={depth}"

            def correct(cache: KVCache) -> float:
                out = model.tokenizer.decode(model.generate(suffix, cache.copy(), max_new_tokens=12))
                return 1.0 if str(key) in out else 0.0

            rows.append(Row("needle", item, "full", 1, correct(prefix.cache), entries=prefix.cache.entries()))
            for method in args.methods:
                for ratio in args.ratios:
                    cache, secs, err, capture = compacted(prefix, client, method, ratio, length + 64)
                    rows.append(Row("needle", item, method, ratio, correct(cache), err, secs, cache.entries(), capture))
                    progress(f"needle {length} {depth} {method} {ratio}x")


def paired_against_first(rows: list[Row], methods: list[str], ratios, lines: list[str]) -> None:
    """Change in log-ppl of each method minus the first method's, question by question (paired:
    the same answers), mean +- standard error; only where both ran on the same questions."""
    sel = [r for r in rows if r.task == "quality"]
    if len(methods) < 2 or not sel:
        return
    base = methods[0]
    key = lambda r: (r.item, r.ratio)  # noqa: E731
    lines.extend([f"### Paired against {base} (mean +- s.e. over questions; negative = better than {base})", "",
                  "| method | " + " | ".join(f"{r:g}x" for r in ratios) + " |",
                  "| --- | " + " | ".join("---" for _ in ratios) + " |"])
    for m in methods[1:]:
        cells = []
        for ratio in ratios:
            a = [r for r in sel if r.method == base and r.ratio == ratio]
            b = [r for r in sel if r.method == m and r.ratio == ratio]
            if len(a) >= 2 and [key(r) for r in a] == [key(r) for r in b]:
                d = np.array([r.value for r in b]) - np.array([r.value for r in a])
                cells.append(f"{d.mean():+.3f} +- {d.std(ddof=1) / np.sqrt(len(d)):.3f}")
            else:
                cells.append("-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")


def needle_by_length(rows: list[Row], methods: list[str], lines: list[str]) -> None:
    """Pass-key accuracy per haystack length (items are named 'needle len=N ...'; N rounded down
    to a power of two, the requested length), every ratio pooled."""
    sel = [r for r in rows if r.task == "needle"]
    if not sel:
        return
    def bucket(item: str) -> int:
        n = int(item.split("len=")[1].split()[0])
        return 1 << (n.bit_length() - 1)
    lengths = sorted({bucket(r.item) for r in sel})
    lines.extend(["### By haystack length (tokens; every ratio pooled)", "",
                  "| method | " + " | ".join(str(n) for n in lengths) + " |",
                  "| --- | " + " | ".join("---" for _ in lengths) + " |"])
    for m in ["full", *methods]:
        cells = []
        for n in lengths:
            vals = [r.value for r in sel if r.method == m and bucket(r.item) == n]
            cells.append(f"{np.mean(vals):.0%} ({len(vals)})" if vals else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")


def write_report(rows: list[Row], args, out: str, wall: float) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "wall_seconds": wall, "rows": [asdict(r) for r in rows]}, f, indent=1)
    methods = [m for m in args.methods]
    commands = getattr(args, "commands", None) or [" ".join(args.argv)]
    lines = [f"# Compaction quality: {getattr(args, 'model_name', 'SmolLM2-135M-Instruct')}", ""]
    lines += [f"Command: `python -m kvcompact.eval.quality {c}`  " for c in commands]
    lines += [f"Date: {time.strftime('%Y-%m-%d')}; wall time {wall / 60:.1f} min; server backend: {args.backend}.", ""]

    def table(task: str, title: str, fmt: str, agg) -> None:
        sel = [r for r in rows if r.task == task]
        if not sel:
            return
        lines.extend([f"## {title}", "", "| method | " + " | ".join(f"{r:g}x" for r in args.ratios) + " |",
                      "| --- | " + " | ".join("---" for _ in args.ratios) + " |"])
        for extra in ("full", "no_context"):
            vals = [r.value for r in sel if r.method == extra]
            if vals:
                lines.append(f"| {extra} | " + " | ".join(fmt.format(agg(vals)) for _ in args.ratios) + " |")
        for m in methods:
            cells = []
            for ratio in args.ratios:
                vals = [r.value for r in sel if r.method == m and r.ratio == ratio]
                cells.append(fmt.format(agg(vals)) if vals else "-")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")

    table("quality", "Change in log-perplexity of the full-context answers (nats per token, lower is better)",
          "{:+.3f}", lambda v: float(np.mean(v)))
    paired_against_first(rows, methods, args.ratios, lines)
    se = lambda v: float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")  # noqa: E731
    table("facts", "Dense-fact retrieval accuracy (right candidate of six ranked first; mean +- s.e.)", "{}",
          lambda v: f"{np.mean(v):.0%} +- {se(v):.0%}")
    table("facts_logp", "Dense facts: loss in the right answer's log-probability against the full context "
          "(nats, mean +- s.e.; 0 is lossless)", "{}", lambda v: f"{np.mean(v):+.2f} +- {se(v):.2f}")
    table("needle", "Pass-key retrieval accuracy", "{:.0%}", lambda v: float(np.mean(v)))
    needle_by_length(rows, methods, lines)
    lines.extend(["## Held-out attention-output error reported by the service (mean over heads and items)", "",
                  "| method | " + " | ".join(f"{r:g}x" for r in args.ratios) + " |",
                  "| --- | " + " | ".join("---" for _ in args.ratios) + " |"])
    for m in methods:
        cells = []
        for ratio in args.ratios:
            vals = [r.attn_error for r in rows if r.method == m and r.ratio == ratio and np.isfinite(r.attn_error)]
            cells.append(f"{np.mean(vals):.3f}" if vals else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    times = [r.compact_seconds for r in rows if r.compact_seconds > 0 and r.method != "summary"]
    summary_times = [r.compact_seconds for r in rows if r.method == "summary"]
    capture = {}
    for r in rows:
        if r.capture_seconds > 0:
            capture.setdefault(r.method, {})[r.item] = r.capture_seconds
    capture_line = "; ".join(f"{m} {np.median(list(v.values())):.1f} s" for m, v in sorted(capture.items()))
    lines.extend(["", f"Compaction time per context (all layers, through the service): median "
                      f"{np.median(times):.2f} s over {len(times)} compactions." if times else "",
                  f"Reference-query capture on the client (numpy runtime), median per context: {capture_line}. "
                  "Context-prefill queries come free with the prefill." if capture_line else "",
                  f"Summarization baseline (generation of the summary and prefill of it, numpy runtime): median "
                  f"{np.median(summary_times):.1f} s per context and ratio." if summary_times else "", "",
                  "Items: " + "; ".join(sorted({r.item for r in rows})), ""])
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for task, ylabel, name in (("quality", "delta log-ppl (nats/token)", "quality_logppl.png"),
                                   ("needle", "pass-key accuracy", "needle_accuracy.png")):
            sel = [r for r in rows if r.task == task]
            if not sel:
                continue
            plt.figure(figsize=(6, 4))
            for extra in ("no_context", "full"):
                vals = [r.value for r in sel if r.method == extra]
                if vals:
                    plt.axhline(np.mean(vals), linestyle="--", color="gray", linewidth=1)
                    plt.text(args.ratios[0], np.mean(vals), extra, fontsize=7, color="gray", va="bottom")
            for m in methods:
                ys = [np.mean([r.value for r in sel if r.method == m and r.ratio == ratio] or [np.nan]) for ratio in args.ratios]
                plt.plot(args.ratios, ys, marker="o", label=m)
            plt.xscale("log")
            plt.xlabel("compaction ratio")
            plt.ylabel(ylabel)
            plt.title(f"{getattr(args, 'model_name', 'SmolLM2-135M-Instruct')}: {task}")
            plt.legend(fontsize=8)
            plt.grid(alpha=0.3)
            plt.tight_layout()
            plt.savefig(os.path.join(out, name), dpi=120)
            plt.close()
    except ImportError:
        pass


def merge(files: list[str], out: str) -> None:
    """One report from several runs' results.json (runs split by task or over machines). Every run
    measures the full- and no-context references of its items again: each (task, method, ratio)
    comes from the first run that has it, so repeated rows do not count twice in the means and
    standard errors."""
    rows: list[Row] = []
    runs = [json.load(open(f)) for f in files]
    taken: set = set()
    for run in runs:
        run_rows = [Row(**r) for r in run["rows"]]
        mine = {(r.task, r.method, r.ratio) for r in run_rows} - taken
        rows.extend(r for r in run_rows if (r.task, r.method, r.ratio) in mine)
        taken |= mine
    args = argparse.Namespace(**runs[0]["args"])
    args.methods = list(dict.fromkeys(m for run in runs for m in run["args"]["methods"]))
    args.ratios = sorted({r for run in runs for r in run["args"]["ratios"]})
    # A merged report can be merged again: its runs' commands carry over.
    args.commands = [c for run in runs for c in (run["args"].get("commands") or [" ".join(run["args"]["argv"])])]
    args.argv = ["--merge", *files, "--out", out]
    write_report(rows, args, out, sum(run["wall_seconds"] for run in runs))
    print(f"wrote {out}/report.md from {len(files)} runs")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--out", default="quality-report")
    ap.add_argument("--data", default=None, help="the shared data folder (default: beside the checkout)")
    ap.add_argument("--articles", type=int, default=10)
    ap.add_argument("--first-article", type=int, default=0, help="skip this many QuALITY articles")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--answer-tokens", type=int, default=40)
    ap.add_argument("--queries-per-head", type=int, default=2048)
    ap.add_argument("--ratios", type=float, nargs="+", default=[5, 10, 20, 50, 100])
    ap.add_argument("--methods", nargs="+", default=["am", "am:protect=numbers,protect_before=3", "h2o", "snapkv", "recent",
                                                      "streaming_llm", "random", "summary"],
                    help="service methods (and 'summary', the text-summarization baseline run on the client), "
                         "optionally with options: am:ridge=1e-3, am:queries=repeat "
                         "(query sources: context, repeat, repeat_detail[@share], self_study, detail_questions[@count], detail_spans[@count], "
                         "question, joined by +; "
                         "default repeat+self_study for am, "
                         "context for the baselines); am:protect=numbers,protect_before=3[,protect_after=0][,protect_share=0.5] keeps "
                         "numbers, the tokens that name them (and follow them) exact inside the budget (kvcompact.hf's default for "
                         "text contexts)")
    ap.add_argument("--facts", type=int, default=0, help="dense-fact items per family and length (0: none)")
    ap.add_argument("--facts-lengths", type=int, nargs="*", default=[1024], help="dense-fact document tokens")
    ap.add_argument("--facts-families", nargs="*", default=["records", "ledger", "labs", "agents"])
    ap.add_argument("--needle-lengths", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--needle-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="write one report from earlier runs' results.json files instead of running")
    args = ap.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    if args.merge:
        merge(args.merge, args.out)
        return
    rng = np.random.default_rng(args.seed)
    model = GemmaModel() if args.model == "gemma3" else LlamaModel()
    args.model_name = model.name
    rows: list[Row] = []
    total = (args.articles + args.facts * len(args.facts_lengths) * len(args.facts_families)) * len(args.methods) * \
        len(args.ratios) + \
        len(args.needle_lengths) * len(args.needle_depths) * len(args.methods) * len(args.ratios)
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="compaction")
        progress = lambda label: (bar.set_description(label), bar.update(1))  # noqa: E731
    except ImportError:
        done = [0]

        def progress(label: str) -> None:
            done[0] += 1
            print(f"[{done[0]}/{total}] {label}", flush=True)

    start = time.time()
    with Client(args.server) as client:
        args.backend = client.info().backend
        if args.articles:
            run_quality(model, client, args, rng, rows, progress)
        if args.facts:
            run_facts(model, client, args, rng, rows, progress)
        if args.needle_lengths:
            run_needles(model, client, args, rng, rows, progress)
    write_report(rows, args, args.out, time.time() - start)
    print(f"wrote {args.out}/report.md")


if __name__ == "__main__":
    main()
