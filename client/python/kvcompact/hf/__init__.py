"""kvcompact for HF transformers: capture reference queries with the model, compact its cache
through the service, and decode from the result with `model.generate()` (docs/engines.md).

    from kvcompact import hf
    cache = hf.compact_context(model, tokenizer, text, server="localhost:50051", ratio=20)
    print(hf.answer(model, tokenizer, text, "What is the pass key?", ratio=20))

Needs torch and transformers (`pip install "kvcompact[hf]"`).
"""
from kvcompact.hf.attention import ATTENTION_NAME, enable, kvcompact_attention
from kvcompact.hf.cache import CompactedCache, CompactedLayer, cache_nbytes
from kvcompact.hf.capture import QueryCapture, compactable_layers, context_prefill, prefill, repeat_prefill, self_study
from kvcompact.hf.compact import (QUERY_SOURCES, ChatFormat, answer, batch_inputs, capture_queries, compact_context, compact_ids,
                                  generate, question_ids)
from kvcompact.hf.positions import rerotate_keys, with_physical_positions
from kvcompact.hf.runtime_blocks import from_runtime_blocks, log_probs

__all__ = ["ATTENTION_NAME", "enable", "kvcompact_attention", "CompactedCache", "CompactedLayer", "cache_nbytes",
           "QueryCapture", "compactable_layers", "context_prefill", "prefill", "repeat_prefill", "self_study",
           "QUERY_SOURCES", "ChatFormat", "answer", "capture_queries", "compact_context", "compact_ids", "generate",
           "question_ids", "batch_inputs", "rerotate_keys", "with_physical_positions", "from_runtime_blocks", "log_probs"]
