#!/usr/bin/env python3
"""Greedy decoding after long prompts: how many leading tokens iceformer generates exactly as dense does.

    .venv/bin/python scripts/greedy_match.py --length 8192 --prompts 8 -n 64 --out results/greedy-match.json
    .venv/bin/python scripts/greedy_match.py --variant "" --variant layer_budget=none --floor

Prompts are corpus documents of --length tokens starting at different offsets of the corpus (prompt i at
i x 12,007 tokens while that fits, then half-way between those: 6,003 + j x 12,007). Each prompt is
decoded greedily on the patched build in dense mode (llama.cpp's own attention with flash attention on,
bit-identical to stock) and then in iceformer mode, once per --variant (default settings when none is
given), and the number of identical leading tokens is reported. --floor adds dense with flash attention off:
llama.cpp's own two dense kernels against each other, the rounding floor.

Where a run leaves dense, the report gives dense's logit gap there: dense's logit for its own token minus
its logit for the token the run chose (the two runs share the prefix, so dense's logits at that step are
the reference). A gap near zero is a near tie that any rounding change can flip. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np


def greedy(llm, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """n greedy tokens after prompt, with the logits each was chosen from."""
    import llama_cpp
    from iceformer_llama.runtime.generate import last_logits

    llm.reset()
    llm.eval(prompt)
    toks, logits = [], []
    for _ in range(n):
        row = last_logits(llm, llama_cpp).copy()
        tok = int(row.argmax())
        toks.append(tok)
        logits.append(row)
        if len(toks) < n:
            llm.eval([tok])
    return toks, logits


STRIDE = 12007


def prompt_offsets(corpus_tokens: int, length: int) -> list[int]:
    """Start of each prompt in the corpus: every STRIDE tokens, then the points half-way between."""
    n = corpus_tokens // STRIDE + 1
    first = [i * STRIDE for i in range(n)]
    between = [STRIDE // 2 + j * STRIDE for j in range(n)]
    return [o for o in first + between if o + length <= corpus_tokens]


def compare(dense: list[int], dense_logits: list[np.ndarray], other: list[int]) -> dict:
    same = 0
    while same < min(len(dense), len(other)) and dense[same] == other[same]:
        same += 1
    out = {"identical_leading_tokens": same, "dense_gap_at_divergence": None}
    if same < min(len(dense), len(other)):
        row = dense_logits[same]
        out["dense_gap_at_divergence"] = round(float(row[dense[same]] - row[other[same]]), 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--start", type=int, default=0, help="index of the first prompt (to extend an earlier run)")
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", type=int, default=None, help="speed level of every variant (default: the default level)")
    ap.add_argument("--variant", action="append", default=[], metavar="KNOB=VALUE,...",
                    help="iceformer settings to compare with dense, as in eval (repeatable; \"\" = defaults)")
    ap.add_argument("--floor", action="store_true",
                    help="also compare dense with flash attention off against dense (the rounding floor)")
    ap.add_argument("--out", type=Path, default=Path("results/greedy-match.json"))
    args = ap.parse_args()
    if args.length < 16 or args.prompts < 1 or args.n_predict < 1 or args.start < 0:
        ap.error("need --length >= 16, --prompts >= 1, -n >= 1, --start >= 0")

    import iceformer_llama
    from iceformer_llama.evaluation.corpus import document_tokens, stdlib_text
    from iceformer_llama.evaluation.evaluate import build_variants
    from iceformer_llama.runtime.models import bundled_model_path

    try:
        variants = build_variants(iceformer_llama.IceformerSettings(speed=args.speed), args.variant)
    except ValueError as e:
        ap.error(str(e))
    iceformer_llama.use_backend("patched")
    n_ctx = args.length + args.n_predict + 8
    common = dict(n_ctx=n_ctx, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads)
    llm = iceformer_llama.Llama(str(bundled_model_path()), attention="dense", flash_attn=True, **common)
    fa_off = iceformer_llama.Llama(str(bundled_model_path()), attention="dense", flash_attn=False, **common) \
        if args.floor else None
    labels = [label for label, _ in variants] + (["dense fa=off"] if fa_off else [])
    corpus_tokens = len(llm.tokenize(stdlib_text().encode("utf-8"), add_bos=False))
    offsets = prompt_offsets(corpus_tokens, args.length - 1)
    if args.start + args.prompts > len(offsets):
        ap.error(f"the corpus holds {len(offsets)} prompts of {args.length} tokens; "
                 f"--start {args.start} --prompts {args.prompts} asks for more")
    rows = []
    for i in range(args.start, args.start + args.prompts):
        prompt = document_tokens(llm, args.length - 1, offset_tokens=offsets[i])[:args.length - 1]
        llm.set_attention("dense")
        dense, dense_logits = greedy(llm, prompt, args.n_predict)
        top2 = [np.partition(r, -2)[-2:] for r in dense_logits]
        margins = [float(t[1] - t[0]) for t in top2]
        row = {"prompt": i, "offset": offsets[i], "prompt_tokens": len(prompt), "dense": llm.detokenize(dense).decode("utf-8", "replace"),
               "dense_min_margin_first_32": round(min(margins[:32]), 4), "runs": {}}
        for label, settings in variants:
            llm.set_attention("iceformer", settings)
            toks, _ = greedy(llm, prompt, args.n_predict)
            row["runs"][label] = {**compare(dense, dense_logits, toks),
                                  "text": llm.detokenize(toks).decode("utf-8", "replace")}
        if fa_off:
            toks, _ = greedy(fa_off, prompt, args.n_predict)
            row["runs"]["dense fa=off"] = {**compare(dense, dense_logits, toks),
                                           "text": llm.detokenize(toks).decode("utf-8", "replace")}
        rows.append(row)
        print(f"prompt {i}: {len(prompt)} tokens; dense's smallest top-2 logit margin in the first 32 steps "
              f"{row['dense_min_margin_first_32']:.3f}", flush=True)
        for label in labels:
            r = row["runs"][label]
            gap = "" if r["dense_gap_at_divergence"] is None else f" (dense's gap there {r['dense_gap_at_divergence']:.3f})"
            print(f"  {label:<28} first {r['identical_leading_tokens']:>3} of {args.n_predict} identical{gap}",
                  flush=True)
    llm.close()
    if fa_off:
        fa_off.close()
    need = min(32, args.n_predict)
    summary = {}
    for label in labels:
        runs = [r["runs"][label] for r in rows]
        gaps = [r["dense_gap_at_divergence"] for r in runs if r["identical_leading_tokens"] < need
                and r["dense_gap_at_divergence"] is not None]
        summary[label] = {"prompts_identical_first_32": sum(r["identical_leading_tokens"] >= need for r in runs),
                          "median_identical_leading_tokens": statistics.median(r["identical_leading_tokens"] for r in runs),
                          "dense_gaps_where_left_before_32": gaps}
        print(f"{label}: {summary[label]['prompts_identical_first_32']}/{len(rows)} prompts identical for the first "
              f"{need} tokens; median {summary[label]['median_identical_leading_tokens']} leading tokens; dense's gap "
              f"where it left earlier: {', '.join(f'{g:.3f}' for g in gaps) or '-'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["scripts/greedy_match.py", *sys.argv[1:]]),
                                    "length": args.length, "n_predict": args.n_predict, "speed": args.speed,
                                    "variants": labels, "summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
