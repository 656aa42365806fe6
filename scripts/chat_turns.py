#!/usr/bin/env python3
"""A 20-turn chat over about 6k tokens, run three ways side by side: stock llama.cpp (dense), the patched
build in dense mode and the patched build in iceformer mode (default settings, or --speed N; --variant
runs iceformer once per setting given, as in eval).

    .venv/bin/python scripts/chat_turns.py --turns 20 --out results/chat-turns.json
    .venv/bin/python scripts/chat_turns.py --turns 20 --variant "" --variant dense_prefill=on

Every turn gives the model a new passage of the corpus (about 250 tokens) and asks for one sentence about
it; replies are greedy (temperature 0), at most --reply tokens. The chat template and prefix reuse are
llama-cpp-python's, as in `chat`. Each configuration runs in its own process (one backend per process),
one after another. Reports, per turn, the context size and the turn's wall time for each configuration,
whether patched-dense and each iceformer run gave the same replies as stock, and from which turn on
each iceformer run is faster than stock.
Writes JSON and prints a table; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"stock": ("stock", "dense"), "patched-dense": ("patched", "dense"), "iceformer": ("patched", "iceformer")}


def child(args) -> int:
    import iceformer_llama
    from iceformer_llama.evaluation.corpus import document_tokens
    from iceformer_llama.evaluation.evaluate import variant_overrides
    from iceformer_llama.runtime.models import bundled_model_path

    backend, attention = CONFIGS[args.child]
    iceformer_llama.use_backend(backend)
    settings = iceformer_llama.IceformerSettings(speed=args.speed, **variant_overrides(args.settings)) \
        if attention == "iceformer" else None
    llm = iceformer_llama.Llama(str(bundled_model_path()), attention=attention, iceformer=settings,
                                n_ctx=args.ctx, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
                                flash_attn=True)
    passage_tokens = document_tokens(llm, args.passage * args.turns + 16)
    history, turns = [], []
    for t in range(args.turns):
        chunk = passage_tokens[t * args.passage:(t + 1) * args.passage]
        passage = llm.detokenize(chunk).decode("utf-8", errors="replace").strip()
        history.append({"role": "user", "content": f"Passage {t + 1}:\n{passage}\n\nIn one sentence, what is "
                                                   f"passage {t + 1} about?"})
        t0 = time.perf_counter()
        out = llm.create_chat_completion(messages=history, max_tokens=args.reply, temperature=0.0, seed=0)
        seconds = time.perf_counter() - t0
        reply = out["choices"][0]["message"]["content"]
        history.append({"role": "assistant", "content": reply})
        turns.append({"turn": t + 1, "context_tokens": llm.n_tokens, "seconds": seconds, "reply": reply,
                      "completion_tokens": out["usage"]["completion_tokens"]})
    llm.close()
    print(json.dumps({"config": args.child, "turns": turns}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--passage", type=int, default=250, help="corpus tokens per user turn")
    ap.add_argument("--reply", type=int, default=48, help="tokens per reply at most")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", type=int, default=None, help="latency knob of the iceformer run")
    ap.add_argument("--variant", action="append", default=[], metavar="KNOB=VALUE,...",
                    help="iceformer settings, one iceformer run each, as in eval (repeatable; \"\" = defaults)")
    ap.add_argument("--settings", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("results/chat-turns.json"))
    ap.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.turns < 1 or args.passage < 1 or args.reply < 1:
        ap.error("--turns, --passage and --reply must be positive")
    if args.child:
        return child(args)
    from iceformer_llama.evaluation.evaluate import variant_overrides
    variants = args.variant or [""]
    for spec in variants:
        try:
            variant_overrides(spec)
        except ValueError as e:
            ap.error(str(e))
    configs = [("stock", "stock", ""), ("patched-dense", "patched-dense", "")] + \
        [("iceformer" if not spec else f"iceformer[{spec}]", "iceformer", spec) for spec in variants]
    runs = {}
    for name, config, spec in configs:
        cmd = [sys.executable, __file__, "--child", config, "--turns", str(args.turns), "--passage", str(args.passage),
               "--reply", str(args.reply), "--ctx", str(args.ctx), "--threads", str(args.threads), "--settings", spec]
        if args.speed is not None:
            cmd += ["--speed", str(args.speed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])["turns"]
        print(f"{name}: {sum(t['seconds'] for t in runs[name]):.1f} s over {args.turns} turns", file=sys.stderr)
    ice_names = [name for name, config, _ in configs if config == "iceformer"]
    same = {name: [a["reply"] == b["reply"] for a, b in zip(runs["stock"], runs[name])]
            for name in ["patched-dense", *ice_names]}
    print(f"{'turn':>4} {'context':>8} {'stock s':>8} {'dense s':>8}" + "".join(f" {n[:24]:>24}" for n in ice_names)
          + "  same replies as stock (dense, iceformer runs)")
    faster_from = {}
    for name in ice_names:
        first = None
        for st, ice in zip(runs["stock"], runs[name]):
            if st["seconds"] / ice["seconds"] <= 1:
                first = None   # "from the turn on": the first turn after which it stays faster
            elif first is None:
                first = st["turn"]
        faster_from[name] = first
    for i, st in enumerate(runs["stock"]):
        cells = "".join(f" {runs[n][i]['seconds']:.2f} s {st['seconds'] / runs[n][i]['seconds']:.2f}x".rjust(25)
                        for n in ice_names)
        marks = " ".join("yes" if same[n][i] else "NO" for n in same)
        print(f"{st['turn']:4d} {st['context_tokens']:8d} {st['seconds']:8.2f} {runs['patched-dense'][i]['seconds']:8.2f}"
              f"{cells}  {marks}")
    for name in same:
        print(f"{name}: {sum(same[name])}/{len(same[name])} replies identical to stock"
              + (f"; {sum(t['seconds'] for t in runs[name]):.1f} s in all against stock's "
                 f"{sum(t['seconds'] for t in runs['stock']):.1f} s; faster than stock from turn {faster_from[name]} on"
                 if name in faster_from else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["scripts/chat_turns.py", *sys.argv[1:]]),
                                    "identical_replies_to_stock": {n: sum(v) for n, v in same.items()},
                                    "turns": args.turns, "faster_than_stock_from_turn": faster_from,
                                    "runs": runs}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
