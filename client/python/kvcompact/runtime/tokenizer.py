"""The tokenizer and chat template stored in a GGUF file (gpt2-style byte-level BPE)."""
from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


class GGUFTokenizer:
    def __init__(self, metadata: dict):
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        # SmolLM2's pre-tokenizer: single digits, then GPT-2 byte-level splitting.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
        specials = [t for t, ty in zip(tokens, types) if ty == 3]  # CONTROL tokens
        tok.add_special_tokens(specials)
        self._tok = tok
        self.bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        self.eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        self.chat_template = metadata.get("tokenizer.chat_template", "")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False)
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)
