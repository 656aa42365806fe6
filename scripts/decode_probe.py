#!/usr/bin/env python3
"""Decode speed of the patched build alone, several attention settings in one process.

    .venv/bin/python scripts/decode_probe.py default top_blocks=1,window=48,block_share=0 --rounds 3 -n 96

(`top_blocks=1,window=48,block_share=0` reads almost nothing: the ceiling. Without `block_share=0` the
default share of the blocks still applies.)

Prefills a corpus document of --length tokens once (with --prefill's setting) and saves llama.cpp's
state to a file (kept across runs with --state); then, for each round and each setting in turn, loads that state, sets the attention
(`dense`, `default`, or IceFormer knobs as `name=value,...`), and decodes -n greedy tokens, timing all
but the first two (the first rebuilds the kernel's state after the load). Prints tokens/s per round and
the median. Settings alternate within one process, so machine drift hits them alike; compare builds by
alternating processes (each process loads the build `python -m iceformer_llama setup` made last), and the
kernel's AVX-512 row forms the same way, with ICEFORMER_SIMD=avx512 or avx512-ymm (printed, and in the JSON).
A probe, not the benchmark: stock is not run here (scripts/bench.sh is the side-by-side comparison).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_setting(text: str):
    from iceformer_llama.evaluation.evaluate import variant_overrides
    from iceformer_llama.runtime.settings import IceformerSettings

    if text == "dense":
        return "dense", None
    if text == "default":
        return "iceformer", IceformerSettings()
    return "iceformer", IceformerSettings(**variant_overrides(text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("settings", nargs="+", help="dense, default, or knobs such as top_blocks=32,window=64")
    ap.add_argument("--model", default=None, help="GGUF path (default: the bundled model)")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--state", type=Path, default=None, help="state file to reuse (default: a temporary one)")
    ap.add_argument("--prefill", default="dense",
                    help="setting that prefills the prompt when --state does not exist yet (default dense: a "
                         "sparse one is faster at 32k; its cache differs a little, which a speed probe tolerates)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    if args.length < 16 or args.n_predict < 3 or args.rounds < 1:
        ap.error("need --length >= 16, -n >= 3, --rounds >= 1")

    import numpy as np

    import iceformer_llama
    from iceformer_llama.evaluation.corpus import document_tokens

    try:
        settings = {s: parse_setting(s) for s in args.settings}
        prefill = parse_setting(args.prefill)
    except (ValueError, TypeError) as e:
        ap.error(str(e))
    iceformer_llama.use_backend("patched")
    # the prompt is prefilled (and its state saved) with --prefill's attention; each setting is set per round
    llm = iceformer_llama.Llama(args.model, attention="dense", n_ctx=args.length + args.n_predict + 64, n_batch=512,
                                n_ubatch=512, n_threads=args.threads, n_threads_batch=args.threads, flash_attn=True)
    import llama_cpp

    ctx, inner, n_vocab = llm.llama.ctx, llm.llama, llm.n_vocab()
    tokens = document_tokens(llm, args.length)
    tmp = tempfile.TemporaryDirectory()
    state = args.state or Path(tmp.name) / "state.bin"
    if not state.exists():
        llm.set_attention(*prefill)
        llm.eval(tokens)
        saved = (llama_cpp.llama_token * len(tokens))(*tokens)
        if not llama_cpp.llama_state_save_file(ctx, str(state).encode(), saved, len(tokens)):
            print(f"error: could not save the state to {state}", file=sys.stderr)
            return 1

    rates: dict[str, list[float]] = {s: [] for s in args.settings}
    buf = (llama_cpp.llama_token * (args.length + 64))()
    for r in range(args.rounds):
        for name, (attention, knobs) in settings.items():
            llm.set_attention(attention, knobs)
            n = ctypes.c_size_t(0)
            if not llama_cpp.llama_state_load_file(ctx, str(state).encode(), buf, len(buf), ctypes.byref(n)):
                print(f"error: could not load {state} (made by another model or length?)", file=sys.stderr)
                return 1
            # drop the last prompt token and decode it again, so the first logits come from this setting
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, n.value - 1, -1)
            inner.input_ids[: n.value] = list(buf[: n.value])
            inner.n_tokens = n.value - 1
            tok, stamps = int(buf[n.value - 1]), []
            for _ in range(args.n_predict):
                stamps.append(time.perf_counter())
                llm.eval([tok])
                logits = llama_cpp.llama_get_logits_ith(ctx, -1)
                tok = int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())
            stamps.append(time.perf_counter())
            rate = (args.n_predict - 2) / (stamps[-1] - stamps[2])
            rates[name].append(rate)
            print(f"round {r}  {name:40s} {rate:7.2f} tokens/s", flush=True)
    from iceformer_llama.runtime import native

    simd = native.simd_variant()   # libllama's kernel picks its SIMD form by the same rules (ICEFORMER_SIMD)
    print(f"simd: {simd}")
    for name, v in rates.items():
        print(f"{name:40s} median {statistics.median(v):7.2f}  [{min(v):.1f}-{max(v):.1f}]")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "length": args.length,
                                        "n_predict": args.n_predict, "threads": args.threads, "simd": simd,
                                        "tokens_per_second": rates}, indent=1) + "\n")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
