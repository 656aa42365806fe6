#!/usr/bin/env python3
"""Greedy decoding after long prompts: how many leading tokens iceformer generates exactly as dense does.

    .venv/bin/python scripts/greedy_match.py --length 8192 --prompts 4 -n 64 --out results/greedy-match.json

Prompts are corpus documents of --length tokens starting at different offsets of the corpus. Each prompt is
decoded greedily twice on the patched build, in dense mode (llama.cpp's own attention, bit-identical to
stock) and in iceformer mode (default settings or --speed), and the number of identical leading tokens
is reported. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", type=int, default=None)
    ap.add_argument("--against", choices=("iceformer", "dense-fa-off"), default="iceformer",
                    help="what to compare with dense (flash attention on): iceformer (default), or dense with "
                         "flash attention off, the rounding floor (llama.cpp's own two dense kernels)")
    ap.add_argument("--out", type=Path, default=Path("results/greedy-match.json"))
    args = ap.parse_args()
    if args.length < 16 or args.prompts < 1 or args.n_predict < 1:
        ap.error("need --length >= 16, --prompts >= 1, -n >= 1")

    import iceformer_llama
    from iceformer_llama.corpus import document_tokens
    from iceformer_llama.models import bundled_model_path

    iceformer_llama.use_backend("patched")
    settings = iceformer_llama.IceformerSettings(speed=args.speed)
    n_ctx = args.length + args.n_predict + 8
    llm = iceformer_llama.Llama(str(bundled_model_path()), attention="dense", n_ctx=n_ctx, n_batch=512,
                                n_threads=args.threads, n_threads_batch=args.threads, flash_attn=True)
    other = llm
    if args.against == "dense-fa-off":
        other = iceformer_llama.Llama(str(bundled_model_path()), attention="dense", n_ctx=n_ctx, n_batch=512,
                                      n_threads=args.threads, n_threads_batch=args.threads, flash_attn=False)
    rows = []
    for i in range(args.prompts):
        prompt = document_tokens(llm, args.length - 1, offset_tokens=i * 12007)[:args.length - 1]
        outs = {}
        for mode in ("dense", "iceformer"):
            run = llm if mode == "dense" else other
            if args.against == "iceformer":
                run.set_attention(mode, settings if mode == "iceformer" else None)
            run.reset()
            toks = []
            for tok in run.generate(prompt, temp=0.0, reset=True):
                toks.append(int(tok))
                if len(toks) == args.n_predict:
                    break
            outs[mode] = toks
        same = 0
        while same < len(outs["dense"]) and same < len(outs["iceformer"]) and \
                outs["dense"][same] == outs["iceformer"][same]:
            same += 1
        rows.append({"prompt": i, "prompt_tokens": len(prompt), "identical_leading_tokens": same,
                     "dense": llm.detokenize(outs["dense"]).decode("utf-8", "replace"),
                     "iceformer": llm.detokenize(outs["iceformer"]).decode("utf-8", "replace")})
        print(f"prompt {i}: {len(prompt)} tokens, first {same} of {args.n_predict} generated tokens identical "
              f"({args.against} against dense)",
              flush=True)
    llm.close()
    if other is not llm:
        other.close()
    n32 = sum(r["identical_leading_tokens"] >= min(32, args.n_predict) for r in rows)
    print(f"{n32}/{len(rows)} prompts identical for at least the first {min(32, args.n_predict)} tokens")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["scripts/greedy_match.py", *sys.argv[1:]]),
                                    "length": args.length, "n_predict": args.n_predict, "speed": args.speed,
                                    "against": args.against,
                                    "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
