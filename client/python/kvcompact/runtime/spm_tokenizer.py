"""The SentencePiece BPE tokenizer stored in a GGUF file (Gemma), as llama.cpp runs it: spaces
become "▁", control tokens are matched first, then each piece starts as characters and the
adjacent pair whose merge is in the vocabulary with the highest score merges first (the scores
are merge priorities); what is left outside the vocabulary falls back to <0xXX> byte tokens.
Gemma GGUF files carry no chat template; Gemma's turn format is applied here."""
from __future__ import annotations

import heapq
import re
from typing import Sequence


class GGUFSentencePieceTokenizer:
    def __init__(self, metadata: dict):
        self.tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        self.scores = [float(s) for s in metadata["tokenizer.ggml.scores"]]
        types = metadata.get("tokenizer.ggml.token_type", [1] * len(self.tokens))
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.unk_id = int(metadata.get("tokenizer.ggml.unknown_token_id", 0))
        self.bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        self.eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        self.end_of_turn = "<end_of_turn>"
        specials = sorted((t for t, ty in zip(self.tokens, types) if ty == 3 and t), key=len, reverse=True)
        self._special = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")") if specials else None
        self._byte = {i: int(t[3:5], 16) for i, t in enumerate(self.tokens) if len(t) == 6 and t.startswith("<0x")}
        self._byte_id = {b: i for i, b in self._byte.items()}

    def _bpe(self, text: str) -> list[int]:
        symbols = list(text)
        if not symbols:
            return []
        prev = list(range(-1, len(symbols) - 1))
        nxt = list(range(1, len(symbols) + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, str]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if i < 0 or j < 0:
                return
            merged = symbols[i] + symbols[j]
            tid = self.vocab.get(merged)
            if tid is not None:
                heapq.heappush(heap, (-self.scores[tid], i, j, merged))  # highest score, then leftmost

        for i in range(len(symbols) - 1):
            push(i)
        while heap:
            _, i, j, merged = heapq.heappop(heap)
            if nxt[i] != j or symbols[i] + symbols[j] != merged:
                continue  # stale: one side merged since
            symbols[i], symbols[j] = merged, ""
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            push(i)
            if prev[i] >= 0:
                push(prev[i])
        ids: list[int] = []
        i = 0
        while i >= 0:
            tid = self.vocab.get(symbols[i])
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._byte_id.get(b, self.unk_id) for b in symbols[i].encode("utf-8"))
            i = nxt[i]
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        parts = self._special.split(text) if self._special else [text]
        for k, part in enumerate(parts):
            if k % 2 == 1:
                ids.append(self.vocab[part])
            elif part:
                ids.extend(self._bpe(part.replace(" ", "▁")))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            if i in self._byte:
                out.append(self._byte[i])
            else:
                out.extend(self.tokens[i].replace("▁", " ").encode("utf-8"))
        return out.decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int:
        return self.vocab[token]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Gemma's format: <bos>, then <start_of_turn>user|model ... <end_of_turn> per message
        (a system message goes in front of the first user turn)."""
        out, system = "<bos>", ""
        for m in messages:
            if m["role"] == "system":
                system = m["content"] + "\n\n"
                continue
            role = "model" if m["role"] == "assistant" else "user"
            content = (system + m["content"]) if role == "user" else m["content"]
            system = ""
            out += f"<start_of_turn>{role}\n{content}<end_of_turn>\n"
        if add_generation_prompt:
            out += "<start_of_turn>model\n"
        return out
