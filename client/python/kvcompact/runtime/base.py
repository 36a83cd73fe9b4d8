"""What the runtime's models share on top of their forward pass: teacher-forced log-probabilities
and greedy or sampled generation."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from kvcompact.runtime.cache import KVCache


class CausalLM:
    """Subclasses provide forward(tokens, cache) -> logits [n, vocab] and stop_ids()."""

    # Closes the user's turn and opens the model's (the chat template's), after an instruction.
    reply_prefix = ""

    def stop_ids(self) -> set[int]:
        raise NotImplementedError

    def compactable_layers(self) -> list[int]:
        """Layers whose cache holds the whole context (all, unless the model has sliding windows)."""
        return list(range(self.config.num_layers))

    def log_probs(self, tokens: Sequence[int], cache: KVCache) -> np.ndarray:
        """Teacher-forced log p(tokens[i] | cache, tokens[:i]) for i >= 1; appends to the cache."""
        logits = self.forward(tokens, cache)[:-1].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        return logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]

    def generate(self, prompt: Sequence[int], cache: KVCache, max_new_tokens: int = 32, temperature: float = 0.0,
                 seed: int = 0) -> list[int]:
        """Greedy (temperature 0) or sampled continuation; stops at the model's end tokens."""
        rng = np.random.default_rng(seed)
        stop = self.stop_ids()
        logits = self.forward(prompt, cache)[-1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            if temperature > 0:
                z = (logits - logits.max()) / temperature
                p = np.exp(z) / np.exp(z).sum()
                tok = int(rng.choice(len(p), p=p))
            else:
                tok = int(np.argmax(logits))
            if tok in stop:
                break
            out.append(tok)
            logits = self.forward([tok], cache)[-1]
        return out
