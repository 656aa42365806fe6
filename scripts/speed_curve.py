#!/usr/bin/env python3
"""The latency knob's curve: prefill and decode tokens/s of every --speed level against stock llama.cpp,
side by side in one run, joined with the accuracy of each level from an `eval` JSON.

    .venv/bin/python scripts/speed_curve.py --length 8192 -n 128 --repeat 1 \
        --eval results/speed-eval.json --out results/speed-curve.json

Each measurement is its own `python -m iceformer_llama generate --json` process (bench.run_bench); stock
runs with flash attention on and off and the faster of the two is the baseline, per metric. Configurations
alternate in order between rounds. Run it on an idle machine: two threads collapse when anything else runs.
Writes JSON and a PNG (speed-up against top-1 agreement) beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from iceformer_llama.evaluation import bench
from iceformer_llama.runtime.models import bundled_model_path
from iceformer_llama.runtime.settings import SPEED_LEVELS, IceformerSettings


def measure(args) -> dict:
    """bench's alternating rounds, one patched configuration per level; runs named speed-N or stock-fa-*."""
    model = str(args.model or bundled_model_path())
    levels = [int(x) for x in args.levels.split(",")] if args.levels else sorted(SPEED_LEVELS)
    measured = bench.run_bench(model=model, lengths=[args.length], repeat=args.repeat, threads=args.threads,
                               n_predict=args.n_predict, batch_size=512, attention="iceformer",
                               variants=[(f"speed-{lv}", IceformerSettings(speed=lv)) for lv in levels],
                               flash_attn="auto", stock_flash=["on", "off"], timeout=args.timeout,
                               progress=sys.stderr.isatty(), warmup=0)
    runs = [{**r, "config": r.get("variant", r["config"])} for r in measured["runs"]]
    return {"levels": levels, "runs": runs}


def median_of(runs, name, metric):
    vals = [r[metric] for r in runs if r["config"] == name]
    return statistics.median(vals) if vals else None


def accuracy_by_level(eval_path: Path | None) -> dict:
    """{level: {length: {top1, kl, ppl_dense, ppl_ice}}} from an eval JSON whose variants are speed=N."""
    if not eval_path:
        return {}
    data = json.loads(eval_path.read_text())
    out: dict = {}
    for doc in data.get("documents", []):
        label = doc.get("variant", "")
        if not label.startswith("speed="):
            continue
        lv = int(label.split("=", 1)[1])
        out.setdefault(lv, {})[doc["n_tokens"]] = {
            "top1": doc["top1_agreement"], "kl": doc["mean_kl"], "ppl_dense": doc["ppl_dense"],
            "ppl_ice": doc["ppl_iceformer"]}
    return out


def build_table(result: dict, acc: dict) -> tuple[list[dict], str]:
    runs = result["runs"]
    base = {m: max(v for v in (median_of(runs, "stock-fa-on", m), median_of(runs, "stock-fa-off", m)) if v)
            for m in ("prefill", "decode")}
    rows, lengths = [], sorted({n for a in acc.values() for n in a})
    head = ["speed", "top_blocks", "window"] + [f"top-1 {n}" for n in lengths] + \
           ["prefill tok/s", "prefill x", "decode tok/s", "decode x"]
    lines = ["  ".join(f"{h:>13}" for h in head)]
    for lv in result["levels"]:
        pre, dec = median_of(runs, f"speed-{lv}", "prefill"), median_of(runs, f"speed-{lv}", "decode")
        row = {"speed": lv, **SPEED_LEVELS[lv], "prefill": pre, "decode": dec,
               "prefill_ratio": pre / base["prefill"], "decode_ratio": dec / base["decode"],
               "accuracy": acc.get(lv, {})}
        rows.append(row)
        top1 = [acc.get(lv, {}).get(n, {}).get("top1") for n in lengths]
        cells = [lv, row["top_blocks"], row["window"]] + [f"{t:.3f}" if t is not None else "-" for t in top1] + \
                [f"{pre:.1f}", f"{row['prefill_ratio']:.2f}x", f"{dec:.1f}", f"{row['decode_ratio']:.2f}x"]
        lines.append("  ".join(f"{str(c):>13}" for c in cells))
    lines.append(f"stock (faster flash-attention setting per metric): prefill {base['prefill']:.1f}, "
                 f"decode {base['decode']:.1f} tok/s")
    return rows, "\n".join(lines)


def plot(rows: list[dict], length: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for n in sorted({n for r in rows for n in r["accuracy"]}):
        pts = [(r["decode_ratio"], r["accuracy"][n]["top1"], r["speed"]) for r in rows if n in r["accuracy"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"top-1 at {n} tokens")
        for x, y, lv in pts:
            ax.annotate(str(lv), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0.98, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"decode speed-up over stock after a {length}-token prompt")
    ax.set_ylabel("teacher-forced top-1 agreement with dense")
    ax.set_title("--speed levels (labels), bundled model, 2 threads")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: the bundled model)")
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens (default 8192)")
    ap.add_argument("-n", "--n-predict", type=int, default=128, help="tokens decoded per run (default 128)")
    ap.add_argument("--levels", default="", help="comma-separated levels (default: all)")
    ap.add_argument("--repeat", type=int, default=1, help="measured rounds (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--eval", type=Path, default=None, help="eval JSON with speed=N variants (accuracy)")
    ap.add_argument("--out", type=Path, default=Path("results/speed-curve.json"))
    args = ap.parse_args()
    if args.length < 1 or args.repeat < 1 or args.n_predict < 1:
        ap.error("--length, --repeat and -n must be positive")
    if args.levels and any(int(x) not in SPEED_LEVELS for x in args.levels.split(",")):
        ap.error(f"--levels must be among {sorted(SPEED_LEVELS)}")
    started = time.time()
    result = measure(args)
    rows, table = build_table(result, accuracy_by_level(args.eval))
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["scripts/speed_curve.py", *sys.argv[1:]]), "length": args.length,
        "n_predict": args.n_predict, "threads": args.threads, "repeat": args.repeat,
        "wall_seconds": round(time.time() - started, 1), "rows": rows, "runs": result["runs"]}, indent=1))
    plot(rows, args.length, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
