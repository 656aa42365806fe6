"""Speed of the portable build against this machine's native build, side by side.

Each run is one `generate --json` process (bench's runner) on a corpus document of --length tokens; the
native and portable libraries of each backend alternate within every round (ICEFORMER_LLAMA_BUILD picks
the variant), after one discarded warm-up round. Prints medians [min-max] and portable/native ratios,
writes the JSON and a PNG beside it.

    python -m iceformer_llama build --portable && python -m iceformer_llama build --portable --stock
    .venv/bin/python scripts/portable_speed.py --length 8192 --repeat 3 --threads 2 -n 64 \
        --out results/portable-speed.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from iceformer_llama.evaluation.bench import (_CTX_SLACK, METRICS, Config, _generate_command, run_one, summarize,
                                              write_documents)
from iceformer_llama.evaluation.report import write_results
from iceformer_llama.runtime.models import resolve_model

CONFIGS = (Config("patched", "patched", "iceformer", "auto", []), Config("stock-fa-on", "stock", "dense", "on", []))
BUILDS = ("native", "portable")


def configs(args) -> list[Config]:
    return [c for c in CONFIGS if c.name in args.configs]


def measure(args) -> dict:
    model = str(resolve_model(args.model))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        doc = write_documents(model, [args.length], Path(tmp))[args.length]
        for rnd in range(-1, args.repeat):  # round -1: warm-up, discarded
            for cfg in configs(args):
                for variant in BUILDS:
                    os.environ["ICEFORMER_LLAMA_BUILD"] = variant
                    cmd = _generate_command(cfg, model=model, prompt_file=str(doc), n_predict=args.n_predict,
                                            ctx_size=args.length + args.n_predict + _CTX_SLACK, threads=args.threads,
                                            batch_size=512)
                    out = run_one(cmd, timeout=1800)
                    row = {"round": rnd, "config": cfg.name, "build": variant,
                           "prefill": out["prefill_tokens_per_second"], "decode": out["decode_tokens_per_second"]}
                    print(row, file=sys.stderr, flush=True)
                    if rnd >= 0:
                        runs.append(row)
    summary = {}
    for cfg in configs(args):
        summary[cfg.name] = {}
        for metric in METRICS:
            s = {b: summarize(r[metric] for r in runs if r["config"] == cfg.name and r["build"] == b) for b in BUILDS}
            s["ratio"] = s["portable"]["median"] / s["native"]["median"]
            summary[cfg.name][metric] = s
    return {"model": model, "runs": runs, "summary": summary}


def table(summary: dict) -> str:
    lines = [f"{'config':<12} {'metric':<8} {'native':>22} {'portable':>22} {'portable/native':>16}"]
    for name, metrics in summary.items():
        for metric, s in metrics.items():
            cell = {b: f"{s[b]['median']:.1f} [{s[b]['min']:.1f}-{s[b]['max']:.1f}]" for b in BUILDS}
            lines.append(f"{name:<12} {metric:<8} {cell['native']:>22} {cell['portable']:>22} {s['ratio']:>15.3f}x")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels, ratios = [], []
    for name, metrics in result["summary"].items():
        for metric, s in metrics.items():
            labels.append(f"{name}\n{metric}")
            ratios.append(s["ratio"])
    ax.bar(labels, ratios, color="tab:blue")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.95, color="tab:red", lw=0.8, ls="--", label="-5%")
    ax.set_ylabel("portable / native tokens/s")
    ax.set_ylim(0.8, 1.1)
    ax.legend()
    ax.set_title(f"{result['length']} tokens, {result['threads']} threads, median of {result['repeat']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("-n", "--n-predict", type=int, default=64)
    p.add_argument("--configs", type=lambda s: s.split(","), default=[c.name for c in CONFIGS],
                   help="comma-separated: patched, stock-fa-on (default both)")
    p.add_argument("--out", default="results/portable-speed.json")
    args = p.parse_args()
    started = time.time()
    result = {"command": "scripts/portable_speed.py " + shlex.join(sys.argv[1:]), "length": args.length,
              "repeat": args.repeat, "threads": args.threads, "n_predict": args.n_predict,
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
              **measure(args)}
    result["wall_seconds"] = round(time.time() - started, 1)
    print(table(result["summary"]))
    write_results(result, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
