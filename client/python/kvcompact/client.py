"""The kvcompact client: streams layers to kvcompact-server and collects the compacted blocks."""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence as SequenceABC
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import grpc
import numpy as np

from kvcompact.proto import pb, pb_grpc
from kvcompact.tensors import dtype_size, fill_tensor, from_tensor, numpy_dtype as _numpy_dtype, to_numpy_wire
from kvcompact.types import CompactedHead, CompactedLayer, CompactResult, Layer

METHODS = {
    "am": pb.METHOD_AM_HIGHEST_ATTENTION,
    "recent": pb.METHOD_TRUNCATE_RECENT,
    "streaming_llm": pb.METHOD_STREAMING_LLM,
    "h2o": pb.METHOD_H2O,
    "snapkv": pb.METHOD_SNAPKV,
    "random": pb.METHOD_RANDOM,
    "am_omp": pb.METHOD_AM_OMP,
    "am_omp_fast": pb.METHOD_AM_OMP_FAST,
}
SCORES = {"": pb.SCORE_REDUCE_UNSPECIFIED, "rms": pb.SCORE_REDUCE_RMS, "mean": pb.SCORE_REDUCE_MEAN,
          "max": pb.SCORE_REDUCE_MAX, "rms_max": pb.SCORE_REDUCE_RMS_MAX, "coverage": pb.SCORE_REDUCE_COVERAGE,
          "rms_coverage": pb.SCORE_REDUCE_RMS_COVERAGE}
ALLOCATIONS = {
    "uniform": pb.Allocation.RULE_UNIFORM,
    "pyramid": pb.Allocation.RULE_PYRAMID,
    "profile": pb.Allocation.RULE_PROFILE,
    "global_topk": pb.Allocation.RULE_GLOBAL_TOPK,
    "sensitivity": pb.Allocation.RULE_SENSITIVITY,
}
DTYPES = {"fp32": pb.DTYPE_FP32, "fp16": pb.DTYPE_FP16, "bf16": pb.DTYPE_BF16}
# Methods that select without reference queries; every other method needs Layer.queries.
QUERY_FREE_METHODS = {"recent", "streaming_llm", "random"}
_OVERHEAD = 16 << 10


def _security(root_certificates: Optional[bytes], certificate_chain: Optional[bytes], private_key: Optional[bytes],
              token: Optional[str]) -> tuple:
    """(channel credentials or None, call metadata): TLS when root certificates are given, the
    token as call credentials over TLS, as a bearer header over plaintext."""
    if root_certificates is None:
        return None, ((("authorization", f"Bearer {token}"),) if token else ())
    creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds, ()


def _open_channel(module, target: str, credentials, server_name: Optional[str], index: int):
    """A channel of `module` (grpc or grpc.aio): no message size limits; `index` keeps the
    channels of parallel streams apart (one TCP connection each)."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
               ("kvcompact.channel_index", index), ("grpc.lb_policy_name", "round_robin")]
    if credentials is None:
        return module.insecure_channel(target, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return module.secure_channel(target, credentials, options=options)


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; one of: {', '.join(repr(k) for k in table)}")
    return table[name]


def _check_layer(layer: Layer, method: str, allocation: Optional[str]) -> None:
    """Refuses, before anything is sent, a layer the server would fail: no queries for a method
    (or allocation rule) that needs them."""
    needs = method not in QUERY_FREE_METHODS or allocation in ("global_topk", "sensitivity")
    if needs and layer.queries is None:
        raise ValueError(f"layer {layer.index}: method {method!r}" +
                         (f" with allocation {allocation!r}" if allocation else "") +
                         " needs reference queries (Layer.queries); query-free methods: " +
                         ", ".join(sorted(QUERY_FREE_METHODS)))


class CompactError(RuntimeError):
    """A stream-level failure; `code` is the grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _blocks(heads: int, rows: int, row_bytes: int, max_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """(h0, h1, r0, r1) blocks of a [heads, rows, ...] group that fit the message limit."""
    budget = max(max_bytes - _OVERHEAD, max_bytes // 2)
    per_heads = heads if row_bytes * heads <= budget else 1
    per_rows = max(1, min(rows, budget // (row_bytes * per_heads)))
    for h0 in range(0, heads, per_heads):
        for r0 in range(0, rows, per_rows):
            yield h0, min(heads, h0 + per_heads), r0, min(rows, r0 + per_rows)


def _chunks(layer: Layer, max_bytes: int) -> Iterator[pb.CompactRequest]:
    keys, kdt = to_numpy_wire(layer.keys)
    values, vdt = to_numpy_wire(layer.values)
    bias = bdt = None
    if layer.bias is not None:
        bias, bdt = to_numpy_wire(layer.bias)
    if keys.ndim != 3 or values.ndim != 3 or values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"layer {layer.index}: keys [H, T, d] and values [H, T, dv] expected, "
                         f"got {keys.shape} and {values.shape}")
    heads, tokens, d = keys.shape
    row = d * dtype_size(kdt) + values.shape[2] * dtype_size(vdt) + (dtype_size(bdt) if bias is not None else 0)
    for h0, h1, r0, r1 in _blocks(heads, tokens, row, max_bytes):
        req = pb.CompactRequest()
        c = req.kv
        c.layer, c.head_begin, c.head_end, c.token_begin, c.layer_tokens = layer.index, h0, h1, r0, tokens
        fill_tensor(c.keys, np.ascontiguousarray(keys[h0:h1, r0:r1]), kdt)
        fill_tensor(c.values, np.ascontiguousarray(values[h0:h1, r0:r1]), vdt)
        if bias is not None:
            fill_tensor(c.bias, np.ascontiguousarray(bias[h0:h1, r0:r1]), bdt)
        yield req
    if layer.queries is not None:
        q, qdt = to_numpy_wire(layer.queries)
        n = q.shape[1]
        for h0, h1, r0, r1 in _blocks(heads, n, d * dtype_size(qdt), max_bytes):
            req = pb.CompactRequest()
            c = req.queries
            c.layer, c.head_begin, c.head_end, c.query_begin, c.layer_queries = layer.index, h0, h1, r0, n
            fill_tensor(c.queries, np.ascontiguousarray(q[h0:h1, r0:r1]), qdt)
            yield req
    end = pb.CompactRequest()
    end.layer_end.layer = layer.index
    yield end


class Client:
    """A connection to kvcompact-server. `streams` > 1 spreads layers over parallel streams,
    each on its own channel (its own TCP connection).

    Security: `root_certificates` (PEM bytes) connects over TLS; `certificate_chain` and
    `private_key` add a client certificate (mutual TLS); `token` is sent as a bearer token (as call
    credentials over TLS, as metadata over plaintext); `server_name` overrides the TLS name."""

    def __init__(self, target: str = "localhost:50051", streams: int = 1, max_message_bytes: int = 4 << 20, *,
                 root_certificates: Optional[bytes] = None, certificate_chain: Optional[bytes] = None,
                 private_key: Optional[bytes] = None, token: Optional[str] = None, server_name: Optional[str] = None):
        self.target = target
        self.streams = max(1, streams)
        self.max_message_bytes = max_message_bytes
        self._credentials, self._metadata = _security(root_certificates, certificate_chain, private_key, token)
        self._server_name = server_name
        self._channels = [self._channel(i) for i in range(self.streams)]

    def _channel(self, index: int) -> grpc.Channel:
        return _open_channel(grpc, self.target, self._credentials, self._server_name, index)

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self, timeout: float = 10) -> pb.ServerInfo:
        return pb_grpc.KVCompactStub(self._channels[0]).GetServerInfo(pb.ServerInfoRequest(), timeout=timeout,
                                                                      metadata=self._metadata)

    def self_test(self, timeout: float = 120, **fields) -> pb.SelfTestResponse:
        return pb_grpc.KVCompactStub(self._channels[0]).SelfTest(pb.SelfTestRequest(**fields), timeout=timeout,
                                                                 metadata=self._metadata)

    def header(self, layers: Layer | Sequence[Layer], **options) -> pb.StreamHeader:
        """The StreamHeader for `layers`; see make_header()."""
        return make_header(layers, **options)

    def compact(self, layers: Iterable[Layer], *, on_layer: Optional[Callable[[CompactedLayer], None]] = None,
                timeout: Optional[float] = None, **options) -> CompactResult:
        """Compacts `layers`; options as in `header()`. `layers` may be any iterable, e.g. a
        generator that yields each layer as the model computes it (then pass `num_layers`); with
        `streams` > 1 each stream takes the next layer as it is ready. Failed layers are in
        result.errors; a stream-level failure raises CompactError; bad options or a layer without
        the queries its method needs raise ValueError before that layer is sent."""
        source, first = _first(layers)
        header = self.header(first if not isinstance(layers, SequenceABC) else layers, **options)
        method, allocation = options.get("method", "am"), options.get("allocation")
        if isinstance(layers, SequenceABC):
            for layer in layers:
                _check_layer(layer, method, allocation)
        collector = _Collector(header, on_layer)
        lock = threading.Lock()
        failures: list[BaseException] = []

        def next_layer() -> Optional[Layer]:
            with lock:
                layer = next(source, None)
            if layer is not None:
                _check_layer(layer, method, allocation)
            return layer

        def run(s: int) -> None:
            def requests() -> Iterator[pb.CompactRequest]:
                first_msg = pb.CompactRequest()
                first_msg.header.CopyFrom(header)
                if self.streams > 1:
                    first_msg.header.request_id = f"{header.request_id}/{s}"
                yield first_msg
                try:
                    while (layer := next_layer()) is not None:
                        yield from _chunks(layer, self.max_message_bytes)
                except Exception as e:  # noqa: BLE001 -- raised again in the caller's thread
                    with lock:
                        failures.append(e)
                    raise

            try:
                for resp in pb_grpc.KVCompactStub(self._channels[s]).Compact(requests(), timeout=timeout,
                                                                        metadata=self._metadata):
                    collector.add(resp)
            except grpc.RpcError as e:
                with lock:
                    failures.append(CompactError(e.code(), e.details()))

        streams = min(self.streams, len(layers)) if isinstance(layers, SequenceABC) else self.streams
        threads = [threading.Thread(target=run, args=(s,)) for s in range(1, streams)]
        for t in threads:
            t.start()
        run(0)
        for t in threads:
            t.join()
        if failures:  # the client's own error (a bad layer) first, then the server's
            raise next((f for f in failures if not isinstance(f, CompactError)), failures[0])
        return collector.result()


def ratio_budget(tokens: int, ratio: float) -> int:
    """Entries per head the service keeps of `tokens` at `ratio`: round(T / ratio), halves away
    from zero, in [1, T] (server/stream_plan.cc)."""
    if not ratio > 0:
        raise ValueError("ratio must be > 0")
    return int(min(tokens, max(1, math.floor(tokens / ratio + 0.5))))


def protected_plan(start: int, end: int, protected: Sequence[int], ratio: Optional[float] = None,
                   tokens: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Splits the span [start, end) for compaction with `protected` positions kept exact: returns
    (the rest, compacted; the protected, sorted and unique; entries per head left for the rest).
    The protected count against the span's budget: `tokens`, else `ratio`'s round(T / ratio)."""
    exact = np.unique(np.asarray(list(protected), dtype=np.int64))
    if exact.size and (exact[0] < start or exact[-1] >= end):
        raise ValueError(f"protected positions must lie in the compacted span [{start}, {end})")
    if (ratio is None) == (tokens is None):
        raise ValueError("protected positions take a budget of either ratio or tokens")
    total = int(tokens) if tokens is not None else ratio_budget(end - start, ratio)
    if exact.size >= total:
        raise ValueError(f"{exact.size} protected positions leave nothing of a budget of {total} per head")
    return np.setdiff1d(np.arange(start, end), exact), exact, total - int(exact.size)


def number_spans(pieces: Sequence[str], *, surprisal: Optional[Sequence[float]] = None, before: int = 3,
                 start: int = 0, end: Optional[int] = None, after: int = 0) -> list[tuple[int, int, int]]:
    """Every number in [start, end) (a run of tokens whose text holds a digit: lab values, amounts,
    dates, keys) as (first of the `before` tokens that name it, first digit, end of the number and
    of the `after` tokens that follow it); the least predictable first (highest `surprisal` of its
    digits), in order of appearance without it. `pieces`: each token's text."""
    end = len(pieces) if end is None else end
    digit = [any(c.isdigit() for c in pieces[p]) for p in range(end)]
    spans, p = [], start
    while p < end:
        if digit[p]:
            q = p
            while q < end and digit[q]:
                q += 1
            spans.append((max(start, p - before), p, min(end, q + after)))
            p = q
        else:
            p += 1
    if surprisal is not None:
        s = np.asarray(surprisal, dtype=np.float64)
        spans.sort(key=lambda sp: -float(np.max(s[sp[1]:sp[1] + _digits(digit, sp[1])])))
    return spans


def _digits(digit: Sequence[bool], first: int) -> int:
    """Length of the run of digit tokens from `first`."""
    q = first
    while q < len(digit) and digit[q]:
        q += 1
    return q - first


def number_positions(pieces: Sequence[str], budget: int, *, surprisal: Optional[Sequence[float]] = None,
                     share: float = 0.5, before: int = 3, start: int = 0, end: Optional[int] = None,
                     after: int = 0) -> np.ndarray:
    """Positions in [start, end) to keep exact so that numbers survive compaction: each number
    (number_spans) with the `before` tokens that name it ("pass key is", "glucose:") and the
    `after` tokens that follow it ("crates of lemons"); whole numbers, the least predictable
    first, until `share` of `budget` is used."""
    if not 0 <= share < 1:
        raise ValueError("share must be in [0, 1): the rest of the budget is compacted")
    cap, kept = int(share * budget), set()
    for first, _, stop in number_spans(pieces, surprisal=surprisal, before=before, start=start, end=end, after=after):
        new = set(range(first, stop)) - kept  # a span's naming tokens may overlap the previous number
        if len(kept) + len(new) <= cap:
            kept |= new
    return np.array(sorted(kept), dtype=np.int64)


DETAIL_QUESTION = 'What is the number after "{name}" in the text above?'
DETAIL_SPAN_QUESTION = 'What comes after "{name}" in the text above?'


def detail_questions(pieces: Sequence[str], surprisal: Sequence[float], count: int = 8, before: int = 4,
                     start: int = 0, spans: bool = False) -> list[str]:
    """Questions about the context's `count` least predictable numbers, each named by the words in
    the `before` tokens in front of it ('What is the number after "pass key is" in the text
    above?'); numbers with no word in front are skipped. With `spans`, about its least predictable
    words of any kind (names, code names, places; numbers keep their wording), at least `before`
    tokens apart: 'What comes after "the code name" in the text above?'. Their queries and those of
    the model's answers are reference queries that find a detail and copy it (docs/QUALITY.md)."""
    if spans:
        return _detail_span_questions(pieces, surprisal, count, before, start)
    out = []
    for first, digit, _ in number_spans(pieces, surprisal=surprisal, before=before, start=start):
        if len(out) == count:
            break
        name = "".join(pieces[first:digit]).strip()
        if any(c.isalpha() for c in name):
            out.append(DETAIL_QUESTION.format(name=name))
    return out


def _detail_span_questions(pieces: Sequence[str], surprisal: Sequence[float], count: int, before: int,
                           start: int) -> list[str]:
    s = np.asarray(surprisal, dtype=np.float64)
    out, taken, names = [], [], set()
    for p in np.argsort(-s[start + before:], kind="stable") + start + before:
        if len(out) == count:
            break
        p = int(p)
        if not any(c.isalnum() for c in pieces[p]) or any(abs(p - q) < before for q in taken):
            continue
        first = p
        if any(c.isdigit() for c in pieces[p]):  # name a number from its first digit token
            while first > start and any(c.isdigit() for c in pieces[first - 1]):
                first -= 1
        lead = max(start, first - before)
        while lead > max(start, first - 2 * before) and pieces[lead][:1].isalnum():
            lead -= 1  # start the name at a word's beginning ("Felix Aydin", not "ix Aydin")
        name = "".join(pieces[lead:first]).strip()
        if not any(c.isalpha() for c in name) or name in names:  # a repeated name asks nothing definite
            continue
        taken.append(p)
        names.add(name)
        wording = DETAIL_QUESTION if any(c.isdigit() for c in pieces[p]) else DETAIL_SPAN_QUESTION
        out.append(wording.format(name=name))
    return out


def detail_positions(surprisal: Sequence[float], share: float = 0.25) -> np.ndarray:
    """Positions j of a context whose next token is among the `share` least predictable
    (surprisal[j + 1] highest): in a pass that repeats the context, the query at j must retrieve
    that token from the cache (a detail: a number, a name, a rare word), not continue the text."""
    if not 0 < share <= 1:
        raise ValueError("share must be in (0, 1]")
    nxt = np.asarray(surprisal[1:], dtype=np.float64)
    if nxt.size == 0:
        return np.empty(0, dtype=np.int64)
    keep = max(1, int(round(share * len(nxt))))
    return np.sort(np.argsort(-nxt, kind="stable")[:keep]).astype(np.int64)



def make_header(layers: Layer | Sequence[Layer], *, ratio: Optional[float] = None, tokens: Optional[int] = None,
           per_head: Optional[Sequence[int]] = None, method: str = "am", holdout: float = 0.1,
           output_dtype: str = "fp32", logit_scale: float = 0.0, num_layers: Optional[int] = None,
           query_heads_per_kv_head: int = 1, return_indices: bool = True, seed: int = 0,
           ridge: float = 0.0, mass_prior: float = 0.0, beta_min: float = 0.0, beta_max: float = 0.0, score: str = "",
           pool_kernel: int = 0, omp_keys_per_step: int = 0, omp_refit_interval: int = 0,
           omp_progressive: float = 0.0, omp_candidates: int = 0, allocation: Optional[str] = None,
           profile: str = "", shares: Optional[Sequence[float]] = None, head_cap: float = 0.0,
           pyramid_spread: float = 0.0, probe_queries: int = 0, chunk_tokens: int = 0,
           request_id: str = "") -> pb.StreamHeader:
    """The StreamHeader for `layers` (geometry from the first layer's shapes).

    Budget: `per_head` (explicit t per layer-major head), `tokens` (the same t everywhere), or
    `ratio` (default 20) -- with `allocation` (one of ALLOCATIONS) splitting the ratio's (or
    `tokens`') total across heads: "profile" takes a server-side `profile` name or inline `shares`. `layers` may be
    the first layer alone when `num_layers` is given (layers streamed as they are computed)."""
    first = layers if isinstance(layers, Layer) else layers[0]
    if num_layers is None and isinstance(layers, Layer):
        raise ValueError("num_layers is needed when the layers are not given as a sequence")
    k_shape, v_shape = tuple(first.keys.shape), tuple(first.values.shape)
    h = pb.StreamHeader(request_id=request_id)
    g = h.geometry
    g.num_layers = num_layers if num_layers is not None else max(l.index for l in layers) + 1
    g.num_kv_heads, g.head_dim, g.value_dim = k_shape[0], k_shape[2], v_shape[2]
    g.query_heads_per_kv_head, g.logit_scale = query_heads_per_kv_head, logit_scale
    o = h.options
    o.method = _lookup(METHODS, method, "method")
    o.holdout_fraction, o.return_indices, o.seed = holdout, return_indices, seed
    o.output_dtype = _lookup(DTYPES, output_dtype, "output_dtype")
    o.ridge, o.mass_prior = ridge, mass_prior  # the fits' priors toward selection; 0: the server's defaults
    o.beta_min, o.beta_max = beta_min, beta_max  # both 0: the method's defaults
    o.score = _lookup(SCORES, score, "score")  # "": the method's default
    o.pool_kernel = int(pool_kernel)
    o.omp.keys_per_step, o.omp.refit_interval = int(omp_keys_per_step), int(omp_refit_interval)
    o.omp.progressive, o.omp.candidates = float(omp_progressive), int(omp_candidates)
    o.chunk_tokens = int(chunk_tokens)  # > 0: compacted in contiguous chunks of at most this many tokens
    if allocation is not None:
        if per_head is not None:
            raise ValueError("an allocation rule decides the per-head budgets: give ratio or tokens, not per_head")
        a = o.budget.allocation
        a.rule = _lookup(ALLOCATIONS, allocation, "allocation")
        # The rule splits round(T / ratio) per head; `tokens` per head is the ratio T / tokens.
        a.ratio = ratio if ratio is not None else (k_shape[1] / tokens if tokens else 20.0)
        a.profile, a.head_cap, a.pyramid_spread, a.probe_queries = profile, head_cap, pyramid_spread, probe_queries
        if shares is not None:
            a.shares.extend(float(x) for x in shares)
    elif per_head is not None:
        o.budget.per_head.tokens.extend(per_head)
    elif tokens is not None:
        o.budget.tokens = tokens
    else:
        o.budget.ratio = ratio if ratio is not None else 20.0
    return h


def _first(layers: Iterable[Layer]) -> tuple[Iterator[Layer], Layer]:
    """An iterator over all of `layers` and the first one (peeked, still yielded)."""
    it = iter(layers)
    first = next(it, None)
    if first is None:
        raise ValueError("no layers to compact")

    def chain() -> Iterator[Layer]:
        yield first
        yield from it

    return chain(), first


class _Collector:
    """Assembles a stream's responses (HeadResult chunks, LayerDone, LayerError, StreamSummary)
    into a CompactResult; thread-safe, shared by the streams of one compaction."""

    def __init__(self, header: pb.StreamHeader, on_layer: Optional[Callable[[CompactedLayer], None]] = None):
        self._header = header
        self._on_layer = on_layer
        self._lock = threading.Lock()
        self._partial: dict[int, dict[int, dict]] = {}
        self._result = CompactResult()

    def add(self, resp: pb.CompactResponse) -> None:
        kind = resp.WhichOneof("msg")
        with self._lock:
            if kind == "head":
                hr = resp.head
                acc = self._partial.setdefault(hr.layer, {}).setdefault(hr.head, {"k": [], "b": [], "v": [], "i": []})
                acc["k"].append(from_tensor(hr.keys))
                acc["b"].append(from_tensor(hr.beta))
                acc["v"].append(from_tensor(hr.values))
                acc["i"].extend(hr.indices)
            elif kind == "layer_done":
                layer = self._layer(resp.layer_done)
                self._result.layers[layer.index] = layer
                if self._on_layer:
                    self._on_layer(layer)
            elif kind == "layer_error":
                self._partial.pop(resp.layer_error.layer, None)
                self._result.errors[resp.layer_error.layer] = resp.layer_error.message
            elif kind == "summary":
                if self._result.summary is None:
                    self._result.summary = pb.StreamSummary()
                _add_summary(self._result.summary, resp.summary)

    def _layer(self, done: pb.LayerDone) -> CompactedLayer:
        heads_acc = self._partial.pop(done.layer, {})
        g = self._header.geometry
        out_dtype = _numpy_dtype(self._header.options.output_dtype)
        heads = []
        for m in done.heads:
            acc = heads_acc.get(m.head, {"k": [], "b": [], "v": [], "i": []})
            cat = (lambda xs, w: np.concatenate(xs) if xs else np.zeros((0, w), out_dtype))
            heads.append(CompactedHead(
                keys=cat(acc["k"], g.head_dim),
                beta=np.concatenate(acc["b"]) if acc["b"] else np.zeros(0, np.float32),
                values=cat(acc["v"], g.value_dim),
                indices=np.asarray(acc["i"], dtype=np.int64),
                tokens_in=m.tokens_in,
                output_rel_error=m.output_rel_error if m.has_quality else None,
                mass_rel_error=m.mass_rel_error if m.has_quality else None))
        return CompactedLayer(done.layer, heads, done.times.total_seconds, done.device_bytes)

    def result(self) -> CompactResult:
        with self._lock:
            self._result.layers = dict(sorted(self._result.layers.items()))
            return self._result


def _add_summary(into: pb.StreamSummary, s: pb.StreamSummary) -> None:
    into.request_id = into.request_id or s.request_id.split("/")[0]
    into.backend = s.backend
    for f in ("layers_done", "layers_failed", "tokens_in", "tokens_out", "bytes_in", "bytes_out"):
        setattr(into, f, getattr(into, f) + getattr(s, f))
    into.wall_seconds = max(into.wall_seconds, s.wall_seconds)


def compact(keys, values, queries=None, *, server: str = "localhost:50051", bias=None, **options) -> CompactResult:
    """The common case in one call: keys/values [layers, kv_heads, T, d], queries
    [layers, kv_heads, n, d] (or lists of per-layer arrays)."""
    n = len(keys)
    layers = [Layer(i, keys[i], values[i], None if queries is None else queries[i], None if bias is None else bias[i])
              for i in range(n)]
    with Client(server) as client:
        return client.compact(layers, **options)
