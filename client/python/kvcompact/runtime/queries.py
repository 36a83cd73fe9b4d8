"""Reference-query capture: the queries the service fits a compacted block to.

Every function returns, per layer, the post-RoPE queries pooled per KV head, shaped
[kv_heads, m, head_dim] (the query heads of a GQA group stacked), ready for `Layer.queries`.

- context-prefill: the context's own queries, captured during its prefill (free);
- repeat-prefill: "Repeat the previous context verbatim." and the context teacher-forced after it:
  queries of tokens that look back at the whole context (one extra prefill);
- repeat-detail: of those, the queries that predict the context's least predictable tokens (the
  highest surprisal in the context's own prefill: numbers, names, rare words), the ones that must
  look back at a detail rather than continue the text;
- self-study: the model answers prompts about the context; the queries of its answers (slowest,
  closest to what later questions ask of the cache);
- detail-questions: questions about the context's least predictable numbers, each named by the
  words in front of it, and the model's answers: queries that find and copy a detail.

The cache passed in is never modified (work happens on copies). The instruction helpers assume a
ChatML model whose cache ends inside an open user turn (the context), as the evaluation builds it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from kvcompact.client import detail_questions as client_detail_questions
from kvcompact.runtime.cache import KVCache

REPEAT_PROMPT = "Repeat the previous context verbatim."
SELF_STUDY_PROMPTS = (
    "Summarize the text above in a few sentences.",
    "List the key facts, names and numbers in the text above.",
    "Ask a question about a detail of the text above, then answer it.",
)


def instruction_tokens(model, text: str) -> list[int]:
    """An instruction appended to the open user turn, then the assistant's turn opened."""
    return model.tokenizer.encode("\n\n" + text + model.reply_prefix)


def _keep_last(queries: list[np.ndarray], n_total: int, keep: int, group: int) -> list[np.ndarray]:
    """From forward()'s [kv, group * n, d] (query-head major), the last `keep` token positions."""
    out = []
    for q in queries:
        kv, _, d = q.shape
        q = q.reshape(kv, group, n_total, d)[:, :, n_total - keep:]
        out.append(np.ascontiguousarray(q.reshape(kv, group * keep, d)))
    return out


def _group(model) -> int:
    return model.config.num_heads // model.config.num_kv_heads


def context_prefill(model, tokens: Sequence[int], surprisal: bool = False):
    """Prefills `tokens` into a new cache; returns it with the tokens' own queries (and, when
    asked, each token's surprisal -log p(token | tokens before it), 0 for the first)."""
    cache = model.new_cache()
    logits, queries = model.forward(list(tokens), cache, capture_queries=True)
    if not surprisal:
        return cache, queries
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    nats = np.concatenate([[0.0], -logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]])
    return cache, queries, nats


def repeat_prefill(model, cache: KVCache, context: Sequence[int], positions: np.ndarray | None = None
                   ) -> list[np.ndarray]:
    """Queries of `context` teacher-forced again after the repeat instruction; `positions`
    (indices into `context`) keeps only those tokens' queries (e.g. detail_positions)."""
    prompt = instruction_tokens(model, REPEAT_PROMPT)
    seq = prompt + list(context)
    _, queries = model.forward(seq, cache.copy(), capture_queries=True)
    out = _keep_last(queries, len(seq), len(context), _group(model))
    if positions is None:
        return out
    return select_positions(out, len(context), positions, _group(model))


def select_positions(queries: list[np.ndarray], n: int, positions: np.ndarray, group: int) -> list[np.ndarray]:
    """From per-layer [kv, group * n, d] (query-head major), the queries of `positions`."""
    out = []
    for q in queries:
        kv, _, d = q.shape
        q = q.reshape(kv, group, n, d)[:, :, np.asarray(positions)]
        out.append(np.ascontiguousarray(q.reshape(kv, group * len(positions), d)))
    return out


def self_study(model, cache: KVCache, prompts: Sequence[str] = SELF_STUDY_PROMPTS, max_new_tokens: int = 64
               ) -> list[np.ndarray]:
    """Queries of the model's own greedy answers to `prompts` about the cached context."""
    per_layer: list[list[np.ndarray]] = [[] for _ in range(model.config.num_layers)]
    for prompt in prompts:
        _answer(model, cache, instruction_tokens(model, prompt), max_new_tokens, per_layer, with_prompt=False)
    if not per_layer[0]:
        raise ValueError("self-study produced no answer tokens")
    return [np.concatenate(qs, axis=1) for qs in per_layer]


def _answer(model, cache: KVCache, prompt: list[int], max_new_tokens: int, per_layer: list[list[np.ndarray]],
            with_prompt: bool) -> None:
    """Runs `prompt` on a copy of `cache` and answers greedily; appends per layer the queries of
    the answer's tokens (and of the prompt's, `with_prompt`)."""
    stop = model.stop_ids()
    c = cache.copy()
    logits, queries = model.forward(prompt, c, capture_queries=True)
    if with_prompt:
        for l, q in enumerate(queries):
            per_layer[l].append(q)
    tok = int(np.argmax(logits[-1]))
    for _ in range(max_new_tokens):
        if tok in stop:
            break
        logits, queries = model.forward([tok], c, capture_queries=True)
        for l, q in enumerate(queries):
            per_layer[l].append(q)
        tok = int(np.argmax(logits[-1]))


def detail_questions(model, cache: KVCache, tokens: Sequence[int], surprisal: np.ndarray, count: int = 8,
                     before: int = 4, answer_tokens: int = 8, start: int = 0, spans: bool = False) -> list[np.ndarray]:
    """Queries of questions about the context's `count` least predictable named numbers
    (kvcompact.client.detail_questions) and of the model's greedy answers: the queries that must
    find a detail and copy it, the kind a later question about a detail makes. A context without
    a named number gives no queries."""
    pieces = [model.tokenizer.decode([t]) for t in tokens]
    per_layer: list[list[np.ndarray]] = [[] for _ in range(model.config.num_layers)]
    for question in client_detail_questions(pieces, surprisal, count, before, start, spans=spans):
        _answer(model, cache, instruction_tokens(model, question), answer_tokens, per_layer, with_prompt=True)
    if not per_layer[0]:
        c = model.config
        return [np.zeros((c.num_kv_heads, 0, c.head_dim), dtype=np.float32) for _ in range(c.num_layers)]
    return [np.concatenate(qs, axis=1) for qs in per_layer]


def combine(*sources: list[np.ndarray]) -> list[np.ndarray]:
    """Per layer, the union of several query sets."""
    return [np.concatenate(parts, axis=1) for parts in zip(*sources)]


def subsample(queries: list[np.ndarray], per_head: int, rng: np.random.Generator) -> list[np.ndarray]:
    """At most `per_head` queries per KV head, the same random rows for every layer."""
    m = queries[0].shape[1]
    if m <= per_head:
        return queries
    idx = np.sort(rng.choice(m, size=per_head, replace=False))
    return [np.ascontiguousarray(q[:, idx]) for q in queries]
