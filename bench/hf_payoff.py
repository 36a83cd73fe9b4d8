"""BENCH-H: the payoff inside an HF transformers model on the GPU (docs/BENCHMARKS.md).

A model built from a published config with random weights (no download; speed does not depend on
the weights), a context of random tokens, then: prefill with query capture, the repeat-prefill
capture, compaction through a running kvcompact-server in one `compact_ids` call (layers streamed
over parallel streams as bf16; the service time is that call less the prefill it repeats), and `model.generate()` decode speed and cache bytes, full cache against compacted, at
each batch size.

    python bench/hf_payoff.py --server 127.0.0.1:50061 --context 32768 --ratio 20 --batch 1,8
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client", "python"))
from kvcompact import hf  # noqa: E402
from kvcompact.hf.capture import cache_kwarg, fork  # noqa: E402

# Llama-3.1-8B's published shape (config.json of meta-llama/Llama-3.1-8B).
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})


TINY = dict(LLAMA_8B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)  # a smoke run of the script on a CPU


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def decode_rate(model, cache_for_batch, prompts, new_tokens):
    """Tokens per second of generate() after the prompt (the first step, the prompt's own pass, excluded)."""
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    batch, inputs = cache_for_batch()
    _, t_one = timed(lambda: model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                                            pad_token_id=0, **{cache_kwarg(model): fork(batch)}))
    batch, inputs = cache_for_batch()
    _, t_all = timed(lambda: model.generate(**inputs, **kw, **{cache_kwarg(model): batch}))
    return len(prompts) * (new_tokens - 1) / (t_all - t_one)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="127.0.0.1:50061")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--ratio", type=float, default=20.0)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the config (0: all)")
    ap.add_argument("--sdpa", default="efficient", choices=("efficient", "auto"),
                    help="compacted layers' SDPA backend on CUDA: memory-efficient (the default), or SDPA's own choice")
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (checks the script, not a figure)")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.sdpa == "auto":
        from kvcompact.hf import attention
        attention.SDPA_BACKENDS.clear()
    cfg = LlamaConfig(**(TINY if args.tiny else LLAMA_8B))
    device = "cpu" if args.tiny else "cuda"
    if args.layers:
        cfg.num_hidden_layers = args.layers
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    hf.enable(model)
    ctx = torch.randint(10, cfg.vocab_size, (args.context,), generator=torch.Generator().manual_seed(1)).tolist()
    instruction = ctx[:12]  # stands in for the repeat instruction's tokens (random weights: any tokens do)
    prompt = ctx[100:116]
    rows = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "layers": cfg.num_hidden_layers,
            "context": args.context, "ratio": args.ratio, "sdpa": args.sdpa}

    with torch.no_grad():
        (full, refs), rows["prefill_capture_s"] = timed(lambda: hf.context_prefill(model, ctx, keep=512))
        repeat, rows["repeat_prefill_s"] = timed(lambda: hf.repeat_prefill(model, full, ctx, instruction, keep=512))
    # The one call users make (prefill, context-prefill capture, service round trip, cache build).
    small, rows["compact_ids_total_s"] = timed(lambda: hf.compact_ids(
        model, ctx, server=args.server, ratio=args.ratio, queries="context-prefill", keep_first=4,
        streams=args.streams))
    rows["compact_service_s"] = rows["compact_ids_total_s"] - rows["prefill_capture_s"]
    rows["bytes_full"] = hf.cache_nbytes(full)
    rows["bytes_compacted"] = hf.cache_nbytes(small)
    del repeat, refs

    for b in [int(x) for x in args.batch.split(",")]:
        prompts = [prompt] * b

        def full_batch():
            c = fork(full)
            if b > 1:
                c.batch_repeat_interleave(b)
            ids = torch.tensor([ctx + prompt] * b, device=device)
            return c, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def small_batch():
            return hf.batch_inputs(model, [small] * b, prompts)

        with torch.no_grad():
            rows[f"decode_tok_s_full_b{b}"] = decode_rate(model, full_batch, prompts, args.new_tokens)
            rows[f"decode_tok_s_compacted_b{b}"] = decode_rate(model, small_batch, prompts, args.new_tokens)
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cuda":
        rows["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for k, v in rows.items():
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    print(json.dumps({"bench": "BENCH-H", **rows}))


if __name__ == "__main__":
    main()
