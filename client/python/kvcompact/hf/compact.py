"""One call from a context to a compacted cache, and the (context, question) -> answer helper.

    from kvcompact.hf import compact_context, answer
    cache = compact_context(model, tokenizer, context_text, server="localhost:50051", ratio=20)
    inputs = cache.generate_inputs([question_ids])
    out = model.generate(**inputs, past_key_values=cache.copy(), max_new_tokens=64)

    answer(model, tokenizer, context_text, "Who signed the lease?", ratio=20)   # -> str

Steps: prefill the context (capturing its queries), capture the chosen reference-query source,
stream every full-attention layer's span [keep_first, T - keep_last) to the service over parallel
streams (bf16/fp16 as the model holds them), and build a `CompactedCache` from the results with the
first and last tokens exact (bias 0). Sliding-window layers stay exact.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from kvcompact.client import (Client, detail_positions, detail_questions, number_positions, protected_plan,
                              ratio_budget)
from kvcompact.hf.cache import CompactedCache
from kvcompact.hf.capture import (compactable_layers, context_prefill, repeat_prefill, sample_positions, self_study,
                                  text_config)
from kvcompact.types import Layer

QUERY_SOURCES = ("context-prefill", "repeat-prefill", "repeat-detail", "detail-questions", "self-study")
DETAIL_SHARE = 0.02  # repeat-detail: the share of positions whose next token is least predictable
DETAIL_QUESTIONS, DETAIL_ANSWER_TOKENS = 8, 8  # detail-questions: numbers asked about, answer tokens
REPEAT_PROMPT = "Repeat the previous context verbatim."
SELF_STUDY_PROMPTS = (
    "Summarize the text above in a few sentences.",
    "List the key facts, names and numbers in the text above.",
    "Ask a question about a detail of the text above, then answer it.",
)


class ChatFormat:
    """Where a user turn's content goes in the tokenizer's chat template: context = head + text
    (the user turn left open), a later instruction = "\\n\\n" + text + tail (turn closed, the
    assistant's opened). Without a template: head is the BOS token, tail a newline."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": "@@"}], tokenize=False,
                                                 add_generation_prompt=True)
            self.head, self.tail = text.split("@@")
        else:
            self.head, self.tail = tokenizer.bos_token or "", "\n"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def context(self, text: str) -> list[int]:
        return self.encode(self.head + text)

    def instruction(self, text: str) -> list[int]:
        return self.encode("\n\n" + text + self.tail)


def _sources(queries: str) -> list[str]:
    parts = [q for q in queries.split("+") if q]
    bad = [q for q in parts if q not in QUERY_SOURCES]
    if bad or not parts:
        raise ValueError(f"queries must be one or more of {QUERY_SOURCES} joined by '+', got {queries!r}")
    return parts


def _repeat_positions(sources: list[str], count: int, keep: int, seed: int, surprisal: Optional[list],
                      detail_share: float) -> torch.Tensor:
    """Positions of the context whose queries the repeat pass keeps: `keep` random ones for
    repeat-prefill, and for repeat-detail those before the least predictable tokens (a share of
    them at repeat-prefill's sampling rate when both are asked for, so that each detail's query
    counts twice, as the harness's repeat+repeat_detail does)."""
    parts = []
    if "repeat-prefill" in sources:
        every = sample_positions(count, keep, seed)
        parts.append(torch.arange(count) if every is None else every)
    if "repeat-detail" in sources:
        detail = torch.from_numpy(detail_positions(surprisal, detail_share))
        take = min(keep, len(detail)) if len(parts) == 0 else max(1, round(len(detail) * min(1.0, keep / count)))
        chosen = sample_positions(len(detail), take, seed + 1)
        parts.append(detail if chosen is None else detail[chosen])
    return torch.sort(torch.cat(parts)).values


def capture_queries(model, ids: Sequence[int], queries: str, fmt: Optional[ChatFormat], max_queries: int,
                    seed: int = 0, self_study_tokens: int = 64, surprisal: Optional[list] = None,
                    detail_share: float = DETAIL_SHARE, pieces: Optional[Sequence[str]] = None):
    """Prefills `ids`; returns (its cache, per compactable layer the chosen sources' queries,
    at most `max_queries` per KV head in all); each token's surprisal into `surprisal` if given.
    `pieces`: each token's text, if the caller has it (detail-questions decodes them otherwise)."""
    sources = _sources(queries)
    c = text_config(model)
    group = c.num_attention_heads // c.num_key_value_heads
    # Token positions per source; the detail sources add a few queries to the others' share.
    counted = [s for s in sources if s != "detail-questions" and (s != "repeat-detail" or "repeat-prefill" not in sources)]
    keep = max(1, max_queries // (group * max(1, len(counted))))
    if ("repeat-detail" in sources or "detail-questions" in sources) and surprisal is None:
        surprisal = []
    cache, own = context_prefill(model, ids, keep, seed, surprisal=surprisal)
    picked = []
    if "context-prefill" in sources:
        picked.append(own)
    if any(s != "context-prefill" for s in sources) and fmt is None:
        raise ValueError("repeat-prefill, repeat-detail, detail-questions and self-study queries need the "
                         "tokenizer (their instructions are text)")
    if "repeat-prefill" in sources or "repeat-detail" in sources:
        positions = _repeat_positions(sources, len(ids), keep, seed, surprisal, detail_share)
        picked.append(repeat_prefill(model, cache, ids, fmt.instruction(REPEAT_PROMPT), positions))
    eos = fmt.tokenizer.eos_token_id if fmt is not None else None
    if "detail-questions" in sources:
        if pieces is None:
            pieces = [fmt.tokenizer.decode([int(t)]) for t in ids]
        questions = detail_questions(pieces, surprisal, count=DETAIL_QUESTIONS)
        if questions:  # a context without a named number adds none
            picked.append(self_study(model, cache, [fmt.instruction(q) for q in questions], DETAIL_ANSWER_TOKENS,
                                     eos_token_id=eos, with_prompts=True))
    if "self-study" in sources:
        picked.append(self_study(model, cache, [fmt.instruction(p) for p in SELF_STUDY_PROMPTS],
                                 self_study_tokens, eos_token_id=eos))
    if not picked:
        raise ValueError(f"queries={queries!r} captured no queries (detail-questions alone, and no named number)")
    merged = {l: torch.cat([p[l] for p in picked], dim=1) for l in picked[0]}
    m = next(iter(merged.values())).shape[1]
    if m > max_queries:  # self-study's answers and repeated details run past it: the same random rows in every layer
        rows = torch.sort(torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:max_queries]).values
        merged = {l: q[:, rows.to(q.device)].contiguous() for l, q in merged.items()}
    return cache, merged


def _logit_scale(model, layer: int) -> float:
    """The attention modules' own scale (Gemma 3 uses query_pre_attn_scalar, not head_dim)."""
    for m in model.modules():
        if getattr(m, "layer_idx", None) == layer and hasattr(m, "scaling"):
            return float(m.scaling)
    return 0.0  # the service's default, 1/sqrt(head_dim)


def compact_ids(model, ids: Sequence[int], *, server: str = "localhost:50051", client: Optional[Client] = None,
                ratio: Optional[float] = 20.0, tokens: Optional[int] = None, method: str = "am",
                queries: str = "repeat-prefill+repeat-detail+detail-questions", tokenizer=None, keep_first: int = 4,
                keep_last: int = 0, streams: int = 4, max_queries: int = 4096, seed: int = 0,
                timeout: Optional[float] = None, protected: Optional[Sequence[int]] = None,
                protect: Optional[str] = None, protect_share: float = 0.5, protect_before: int = 3,
                detail_share: float = DETAIL_SHARE, **options) -> CompactedCache:
    """Compacts the context `ids` (token ids, batch 1); returns the cache to generate from.
    `ratio` or `tokens` (entries per head) set the budget of the compacted span; other keyword
    arguments are the service's options (kvcompact.client.make_header). `queries`: the reference
    queries' sources joined by '+' (QUERY_SOURCES); the default, one extra prefill that repeats
    the context with the queries before its `detail_share` least predictable tokens counted twice,
    and short questions about its least predictable named numbers with their answers, is the best
    measured for contexts of details (every pass key at 20x); for narrative or unknown contexts add
    "+self-study" (the best measured on narrative answers, at most about a nat behind on dense
    facts; docs/QUALITY.md). With either, `allocation="profile"` and `profile=` a retrieval-head
    profile the server loaded (SmolLM2: "smollm2-135m-instruct-retrieval") give the heads that copy
    details more of the budget: a dense fact's loss about halved (docs/QUALITY.md). `protected`: positions
    of the span the caller names (the details a later question may need: numbers, names) kept
    exact with bias 0; they count against the budget and the service compacts the rest.
    `protect="numbers"` (needs `tokenizer`) adds every number with the `protect_before` tokens
    that name it, the least predictable first, up to `protect_share` of the budget
    (kvcompact.client.number_positions; docs/QUALITY.md)."""
    if keep_first < 0 or keep_last < 0 or keep_first + keep_last >= len(ids):
        raise ValueError(f"keep_first={keep_first} and keep_last={keep_last} leave nothing of {len(ids)} tokens")
    if protect not in (None, "numbers"):
        raise ValueError(f"protect={protect!r}: only 'numbers' is defined")
    if (protect or protected) and "per_head" in options:  # make_header would take it over the rest's budget
        raise ValueError("protected positions take a budget of ratio or tokens here, not per_head")
    if protect and tokenizer is None:
        raise ValueError("protect='numbers' needs the tokenizer (numbers are found in the tokens' text)")
    end = len(ids) - keep_last
    fmt = ChatFormat(tokenizer) if tokenizer is not None else None
    surprisal = [] if protect else None
    wants_text = tokenizer is not None and (protect or "detail-questions" in _sources(queries))
    pieces = [tokenizer.decode([int(t)]) for t in ids] if wants_text else None  # each token decoded once
    cache, refs = capture_queries(model, ids, queries, fmt, max_queries, seed, surprisal=surprisal,
                                  detail_share=detail_share, pieces=pieces)
    named = set(int(p) for p in protected) if protected is not None else set()
    if protect:
        total = int(tokens) if tokens is not None else ratio_budget(end - keep_first, ratio)
        named |= set(number_positions(pieces, total, surprisal=surprisal, share=protect_share, before=protect_before,
                                      start=keep_first, end=end).tolist())
    span, exact = torch.arange(keep_first, end), torch.empty(0, dtype=torch.long)
    if named:
        rest, kept, tokens = protected_plan(keep_first, end, sorted(named), None if tokens is not None else ratio, tokens)
        span, exact, ratio = torch.from_numpy(rest), torch.from_numpy(kept), None
    layers = compactable_layers(model)

    def blocks():
        for i, l in enumerate(layers):
            layer = cache.layers[l]
            rows = span.to(layer.keys.device)
            yield Layer(i, layer.keys[0, :, rows], layer.values[0, :, rows], refs[l])

    scale = _logit_scale(model, layers[0])
    budget = {"tokens": tokens} if tokens is not None else {"ratio": ratio}
    own = client is None
    client = client or Client(server, streams=streams)
    try:
        result = client.compact(blocks(), num_layers=len(layers), method=method, logit_scale=scale,
                                query_heads_per_kv_head=text_config(model).num_attention_heads //
                                text_config(model).num_key_value_heads, return_indices=False, seed=seed,
                                timeout=timeout, **budget, **options)
    finally:
        if own:
            client.close()
    if result.errors:
        raise RuntimeError(f"compaction failed for layers {sorted(result.errors)}: {next(iter(result.errors.values()))}")
    compacted = {}
    for i, l in enumerate(layers):
        layer = cache.layers[l]
        dtype, device = layer.keys.dtype, layer.keys.device
        ex = exact.to(device)
        heads = []
        for g, head in enumerate(result.layers[i].heads):
            k = torch.cat([layer.keys[0, g, :keep_first], torch.from_numpy(head.keys).to(device, dtype),
                           layer.keys[0, g, ex], layer.keys[0, g, end:]])
            v = torch.cat([layer.values[0, g, :keep_first], torch.from_numpy(head.values).to(device, dtype),
                           layer.values[0, g, ex], layer.values[0, g, end:]])
            b = torch.cat([torch.zeros(keep_first, device=device), torch.from_numpy(head.beta).to(device),
                           torch.zeros(len(ex) + keep_last, device=device)])
            heads.append((k, v, b))
        compacted[l] = heads
    whole = {l: cache.layers[l] for l in range(len(cache.layers)) if l not in compacted}  # sliding-window layers
    return CompactedCache.from_layers(compacted, whole, len(cache.layers), len(ids))


def compact_context(model, tokenizer, context: str, protect: Optional[str] = "numbers", **kwargs) -> CompactedCache:
    """`compact_ids` for a text context placed in an open user turn of the chat template (so a
    question appended with `question_ids` continues that turn). Numbers are kept exact by default
    (`protect="numbers"`; None turns it off): level on narrative answers, and the pass keys and
    lab values plain AM loses (docs/QUALITY.md)."""
    return compact_ids(model, ChatFormat(tokenizer).context(context), tokenizer=tokenizer, protect=protect, **kwargs)


def question_ids(tokenizer, question: str) -> list[int]:
    """A question closing the user turn that `compact_context` left open, the answer's turn opened."""
    return ChatFormat(tokenizer).instruction(question)


@torch.no_grad()
def batch_inputs(model, caches: Sequence[CompactedCache], prompts: Sequence[Sequence[int]], pad_token_id: int = 0):
    """A batch to `generate` from: each row's prompt but its last token run into a fork of its
    cache, the rows stacked, and the last tokens as one-token prompts. Returns (cache, inputs) for
    `model.generate(**inputs, past_key_values=cache)`; the caches passed in are not modified."""
    from kvcompact.hf.capture import prefill

    if len(caches) != len(prompts) or any(len(p) == 0 for p in prompts):
        raise ValueError("one non-empty prompt per cache")
    rows = []
    for cache, prompt in zip(caches, prompts):
        row = cache.copy()
        if len(prompt) > 1:
            prefill(model, list(prompt)[:-1], cache=row)
        rows.append(row)
    batch = CompactedCache.stack(rows) if len(rows) > 1 else rows[0]
    return batch, batch.generate_inputs([[p[-1]] for p in prompts], pad_token_id=pad_token_id)


def _pad_id(model) -> int:
    g = model.generation_config
    pad = g.pad_token_id if g.pad_token_id is not None else g.eos_token_id
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    return 0 if pad is None else int(pad)


@torch.no_grad()
def generate(model, caches: CompactedCache | Sequence[CompactedCache], prompts: Sequence[Sequence[int]],
             **generate_kwargs) -> list[list[int]]:
    """`model.generate` for one prompt per cache (one cache: the same context for every prompt);
    returns each row's new tokens. The caches are not modified."""
    from kvcompact.hf.capture import cache_kwarg

    if isinstance(caches, CompactedCache):
        caches = [caches] * len(prompts)
    pad = generate_kwargs.pop("pad_token_id", None)
    pad = _pad_id(model) if pad is None else pad
    batch, inputs = batch_inputs(model, caches, prompts, pad)
    out = model.generate(**inputs, pad_token_id=pad, **{cache_kwarg(model): batch}, **generate_kwargs)
    width = inputs["input_ids"].shape[1]
    return [row[width:].tolist() for row in out]


def answer(model, tokenizer, context: str, question: str | Sequence[str], max_new_tokens: int = 64,
           generate_kwargs: Optional[dict] = None, **compact_kwargs) -> str | list[str]:
    """Compacts `context` once and answers `question` (or each of a list, as one batch) greedily
    unless `generate_kwargs` says otherwise; the compaction options as in `compact_ids`."""
    cache = compact_context(model, tokenizer, context, **compact_kwargs)
    many = not isinstance(question, str)
    questions = list(question) if many else [question]
    kw = {"do_sample": False, "max_new_tokens": max_new_tokens, **(generate_kwargs or {})}
    outs = generate(model, cache, [question_ids(tokenizer, q) for q in questions], **kw)
    stop = {tokenizer.eos_token_id}
    texts = [tokenizer.decode([t for t in o if t not in stop], skip_special_tokens=True).strip() for o in outs]
    return texts if many else texts[0]
