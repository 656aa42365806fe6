#!/usr/bin/env python3
"""A long decode with context shift on the patched backend: resident memory stays bounded, and the
IceFormer state stays a small fraction of the KV cache.

    .venv/bin/python scripts/long_run.py --ctx 8192 --prompt 7000 --generate 4096 --out results/long-run.json

Feeds a corpus document of --prompt tokens, then decodes --generate tokens greedily one at a time; when
the context is full it drops half of the tokens after the first --keep (llama.cpp's context shift:
llama_memory_seq_rm + llama_memory_seq_add, which makes the kernel rebuild its state once). Prints, every
--every tokens, the process RSS, llama_iceformer_memory() and decode tokens/s; writes JSON. Exit status 1
when RSS grew by more than --max-growth-mib between the first sample after the first shift and the end.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=7000, help="prompt tokens (a corpus document)")
    ap.add_argument("--generate", type=int, default=4096)
    ap.add_argument("--keep", type=int, default=64, help="tokens never shifted out")
    ap.add_argument("--every", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", type=int, default=None, help="latency knob level (default: library default)")
    ap.add_argument("--max-growth-mib", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=Path("results/long-run.json"))
    args = ap.parse_args()
    if not 0 < args.prompt < args.ctx or args.generate < 1 or not 0 <= args.keep < args.prompt:
        ap.error("need 0 < --prompt < --ctx, --generate >= 1 and 0 <= --keep < --prompt")

    import iceformer_llama
    from iceformer_llama.runtime import backend
    from iceformer_llama.evaluation.corpus import document_tokens
    from iceformer_llama.runtime.models import bundled_model_path

    iceformer_llama.use_backend("patched")
    settings = iceformer_llama.IceformerSettings(speed=args.speed)
    llm = iceformer_llama.Llama(str(bundled_model_path()), attention="iceformer", iceformer=settings,
                                n_ctx=args.ctx, n_batch=512, n_ubatch=512, n_threads=args.threads,
                                n_threads_batch=args.threads, verbose=False)
    lc, ctx = backend.load(), llm.llama.ctx
    mem = lc.llama_get_memory(ctx)
    vocab = lc.llama_model_get_vocab(llm.llama.model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    tokens = document_tokens(llm, args.prompt)[:args.prompt]
    batch = lc.llama_batch_init(512, 0, 1)

    def decode(toks, pos0, want_last=True):
        for start in range(0, len(toks), 512):
            part = toks[start:start + 512]
            for i, t in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = want_last and start + i == len(toks) - 1
            batch.n_tokens = len(part)
            if lc.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
        ptr = lc.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))

    t0 = time.perf_counter()
    logits = decode(tokens, 0)
    prefill_s = time.perf_counter() - t0
    model = llm.llama.model
    n_layer, n_head = lc.llama_model_n_layer(model), lc.llama_model_n_head(model)
    head_dim = lc.llama_model_n_embd(model) // n_head
    kv_bytes = n_layer * args.ctx * 2 * lc.llama_model_n_head_kv(model) * head_dim * 2   # f16 K and V, all cells
    print(f"prompt {len(tokens)} tokens in {prefill_s:.1f} s; KV cache of {args.ctx} cells {kv_bytes / 2**20:.1f} MiB, "
          f"IceFormer state {llm.iceformer_memory() / 2**20:.2f} MiB")
    pos, shifts, samples, first_shift_rss, ice_full = len(tokens), 0, [], None, None
    t_last, n_last = time.perf_counter(), 0
    for i in range(args.generate):
        if pos >= args.ctx:
            if ice_full is None:
                ice_full = llm.iceformer_memory()   # the state over a full cache, before the first shift
                print(f"context full: IceFormer state {ice_full / 2**20:.2f} MiB = "
                      f"{100 * ice_full / kv_bytes:.1f}% of the KV cache", flush=True)
            n_discard = (pos - args.keep) // 2
            lc.llama_memory_seq_rm(mem, 0, args.keep, args.keep + n_discard)
            lc.llama_memory_seq_add(mem, 0, args.keep + n_discard, pos, -n_discard)
            pos -= n_discard
            shifts += 1
        tok = int(np.argmax(logits))
        logits = decode([tok], pos)
        if not np.isfinite(logits).all():
            raise SystemExit(f"non-finite logits at generated token {i}")
        pos += 1
        if shifts and first_shift_rss is None:
            first_shift_rss = rss_bytes()
        if (i + 1) % args.every == 0 or i + 1 == args.generate:
            now = time.perf_counter()
            s = {"generated": i + 1, "rss_mib": rss_bytes() / 2**20, "ice_mib": llm.iceformer_memory() / 2**20,
                 "shifts": shifts, "decode_tok_s": (i + 1 - n_last) / (now - t_last)}
            t_last, n_last = now, i + 1
            samples.append(s)
            print(f"{s['generated']:6d} tokens  RSS {s['rss_mib']:8.1f} MiB  IceFormer {s['ice_mib']:6.2f} MiB  "
                  f"shifts {shifts}  {s['decode_tok_s']:.1f} tok/s", flush=True)
    lc.llama_batch_free(batch)
    growth = (rss_bytes() - first_shift_rss) / 2**20 if first_shift_rss else None
    ok = growth is None or growth <= args.max_growth_mib
    result = {"command": " ".join(["scripts/long_run.py", *sys.argv[1:]]), "ctx": args.ctx,
              "prompt_tokens": len(tokens), "generated": args.generate, "shifts": shifts,
              "kv_cache_bytes": kv_bytes, "ice_bytes_at_full_context": ice_full,
              "ice_fraction_of_kv": ice_full / kv_bytes if ice_full else None, "rss_growth_after_first_shift_mib": growth,
              "max_growth_mib": args.max_growth_mib, "ok": ok, "samples": samples,
              "params": llm.attention_params()}
    llm.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"RSS growth after the first context shift: {growth if growth is None else round(growth, 2)} MiB "
          f"(bound {args.max_growth_mib}); wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
