"""`python -m iceformer_llama bench`: prefill and decode speed, patched (IceFormer) against stock llama.cpp.

Every measurement is its own process running `python -m iceformer_llama generate --json` (one backend per
process), on the same model, threads and prompt (a corpus document of the given length, in a temp file).
Runs alternate between the configurations, after one discarded warm-up round. Stock runs with flash
attention on and off; per length and metric the faster of the two is the baseline (the JSON says which).

    python -m iceformer_llama bench --lengths 512,1024,2048 --repeat 3 --out results/bench.json
    python -m iceformer_llama bench --lengths 8192 --variant "" --variant dense_prefill=on   # two settings

Each --variant (eval's syntax, on top of the knob flags) is one more patched configuration in the same
rounds, so settings are compared with each other and with stock side by side.
Writes the JSON (`--out`) and a PNG beside it (tokens/s and patched/stock ratio against context length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import IceformerError, UsageError
from ..runtime.settings import IceformerSettings
from .report import write_results

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192)
METRICS = ("prefill", "decode")
_RATE_KEY = {"prefill": "prefill_tokens_per_second", "decode": "decode_tokens_per_second"}
_CTX_SLACK = 16  # tokens beyond prompt + generated: re-tokenizing the document text may add a few


# ------------------------------------------------------------------------------------------------
# Pure functions (tested on synthetic numbers)


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not lengths or any(n < 16 for n in lengths):
        raise argparse.ArgumentTypeError(f"lengths must be >= 16 tokens, got {text!r}")
    return sorted(set(lengths))


def cap_lengths(lengths, context_length: int | None) -> list[int]:
    """The lengths that fit in the model's trained context (all of them when it is unknown)."""
    if not context_length:
        return list(lengths)
    return [n for n in lengths if n <= context_length]


def summarize(values) -> dict | None:
    """Median and spread of the measurements (None values, from failed rates, are dropped)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(patched: dict | None, baseline: dict | None) -> float | None:
    """patched / stock, from the medians."""
    if not patched or not baseline or not baseline["median"]:
        return None
    return patched["median"] / baseline["median"]


def pick_baseline(stock: dict[str, dict]) -> tuple[str | None, dict | None]:
    """The stock flash-attention setting with the higher median rate: (setting, its summary)."""
    best = None
    for setting, summary in stock.items():
        if summary and (best is None or summary["median"] > best[1]["median"]):
            best = (setting, summary)
    return best if best else (None, None)


def aggregate(runs: list[dict], lengths, stock_flash: list[str], variants=(None,)) -> list[dict]:
    """One row per length from the individual runs (dicts with length, config, prefill, decode, prompt_tokens).

    config is "patched" or "stock-fa-on" / "stock-fa-off"; patched runs may name their setting in
    "variant" (the labels in `variants`, None when the command compares one setting). The row's "patched"
    and "ratio" are the first setting's, "variants" holds each setting's by label."""
    rows = []
    for n in lengths:
        at = [r for r in runs if r["length"] == n]
        row = {"length": n, "prompt_tokens": max((r["prompt_tokens"] for r in at), default=None),
               "patched": {}, "stock": {}, "baseline": {}, "baseline_flash_attn": {}, "ratio": {}, "variants": {}}
        for metric in METRICS:
            stock = {fa: summarize(r[metric] for r in at if r["config"] == f"stock-fa-{fa}") for fa in stock_flash}
            row["stock"][metric] = stock
            fa, base = pick_baseline(stock)
            row["baseline"][metric] = base
            row["baseline_flash_attn"][metric] = fa
        for label in variants:
            mine = [r for r in at if r["config"] == "patched" and r.get("variant") == label]
            patched = {metric: summarize(r[metric] for r in mine) for metric in METRICS}
            ratios = {metric: ratio(patched[metric], row["baseline"][metric]) for metric in METRICS}
            if label is not None:
                row["variants"][label] = {"patched": patched, "ratio": ratios}
            if label == variants[0]:
                row["patched"], row["ratio"] = patched, ratios
        rows.append(row)
    return rows


def _fmt(summary: dict | None) -> str:
    if not summary:
        return "-"
    if summary["n"] == 1:
        return f"{summary['median']:.1f}"
    return f"{summary['median']:.1f} [{summary['min']:.1f}-{summary['max']:.1f}]"


def format_table(rows: list[dict]) -> str:
    """Median [min-max] tokens/s; stock is the faster flash-attention setting (fa=on/off). With several
    settings (--variant), one line per length and setting."""
    named = any(row.get("variants") for row in rows)
    head = ("length", *(("setting",) if named else ()), "stock prefill", "patched prefill", "ratio",
            "stock decode", "patched decode", "ratio")
    lines = [head]
    for row in rows:
        settings = row["variants"].items() if named else [(None, row)]
        for label, mine in settings:
            cells = [str(row["length"]), *((label,) if named else ())]
            for metric in METRICS:
                fa = row["baseline_flash_attn"][metric]
                r = mine["ratio"][metric]
                cells += [f"{_fmt(row['baseline'][metric])} (fa={fa})" if fa else "-",
                          _fmt(mine["patched"][metric]), f"{r:.2f}x" if r is not None else "-"]
            lines.append(tuple(cells))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def settings_flags(settings: IceformerSettings) -> list[str]:
    """The CLI flags that reproduce `settings` (only the knobs that were set)."""
    flags = []
    for f in dataclasses.fields(IceformerSettings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        kind = f.metadata["kind"]
        if kind is bool:
            text = "on" if value else "off"
        elif kind in ("layers", "budgets"):
            text = ",".join(map(str, value)) or "none"
        else:
            text = str(value)
        flags += [f.metadata["flag"], text]
    return flags


# ------------------------------------------------------------------------------------------------
# Measurement


@dataclasses.dataclass
class Config:
    name: str          # "patched", "stock-fa-on", "stock-fa-off"
    backend: str
    attention: str
    flash_attn: str
    flags: list[str]   # IceFormer knobs (patched only)
    variant: str | None = None  # the --variant label of a patched setting (None: the command's one setting)


def _generate_command(cfg: Config, *, model: str, prompt_file: str, n_predict: int, ctx_size: int, threads: int,
                      batch_size: int) -> list[str]:
    return [sys.executable, "-m", "iceformer_llama", "generate", "--backend", cfg.backend,
            "--attention", cfg.attention, *cfg.flags, "--model", model, "--prompt-file", prompt_file,
            "-n", str(n_predict), "--ctx-size", str(ctx_size), "--threads", str(threads),
            "--batch-size", str(batch_size), "--flash-attn", cfg.flash_attn, "--json"]


def run_one(cmd: list[str], *, timeout: float) -> dict:
    """Runs one `generate --json` process and returns its JSON; IceformerError naming the run on failure."""
    env = dict(os.environ)
    env.pop("ICEFORMER_LLAMA_BACKEND", None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise IceformerError(f"a benchmark run took over {timeout:.0f} s (raise --timeout): {' '.join(cmd[3:])}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise IceformerError(f"a benchmark run failed ({last}): {' '.join(cmd[3:])}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise IceformerError(f"a benchmark run printed no JSON: {' '.join(cmd[3:])}") from None


def write_documents(model: str, lengths, folder: Path) -> dict[int, Path]:
    """Corpus documents of each length (tokens of this model, BOS excluded from the text), as files."""
    from ..runtime import backend
    from ..runtime.llama import Llama
    from .corpus import document_tokens

    # Tokenizing needs a loaded model: the child processes pick their own backend, so this one may use
    # whichever is built (vocab_only: no weights are read).
    backend.use_backend("patched" if backend.find_build("patched") else "stock")
    with backend.quiet_stderr():  # llama.cpp warns that a vocab-only context has no training context
        llm = Llama(model, vocab_only=True, verbose=False)
    try:
        files = {}
        for n in lengths:
            ids = document_tokens(llm, n)
            if ids and ids[0] == llm.token_bos():
                ids = ids[1:]  # `generate` adds BOS itself
            path = folder / f"doc-{n}.txt"
            path.write_bytes(llm.detokenize(ids))
            files[n] = path
        return files
    finally:
        llm.close()


def run_bench(*, model: str, lengths, repeat: int, threads: int, n_predict: int, batch_size: int,
              attention: str, variants: list[tuple[str | None, IceformerSettings]], flash_attn: str,
              stock_flash: list[str], timeout: float, progress: bool, warmup: int = 1) -> dict:
    """variants: (label, settings) of each patched configuration; one with label None when not compared."""
    from tqdm import tqdm

    patched = [Config("patched", "patched", attention, flash_attn, settings_flags(settings), label)
               for label, settings in variants]
    stocks = [Config(f"stock-fa-{fa}", "stock", "dense", fa, []) for fa in stock_flash]
    runs: list[dict] = []
    patched_params: dict = {}
    with tempfile.TemporaryDirectory(prefix="iceformer-bench-") as tmp:
        docs = write_documents(model, lengths, Path(tmp))
        # `warmup` discarded rounds (first length, every configuration), then `repeat` measured rounds; the
        # order of the configurations reverses between rounds so that none always runs on a cooler machine
        plan = [(-1 - w, lengths[0]) for w in range(warmup)] + [(rep, n) for rep in range(repeat) for n in lengths]
        configs = [*stocks, *patched]
        bar = tqdm(total=len(plan) * len(configs), desc="bench", unit="run", file=sys.stderr, disable=not progress)
        try:
            for rep, n in plan:
                for cfg in (configs[::-1] if rep % 2 else configs):
                    bar.set_postfix_str(f"{cfg.name}{' ' + cfg.variant if cfg.variant else ''} {n} tokens")
                    out = run_one(_generate_command(cfg, model=model, prompt_file=str(docs[n]), n_predict=n_predict,
                                                    ctx_size=n + n_predict + _CTX_SLACK, threads=threads,
                                                    batch_size=batch_size), timeout=timeout)
                    bar.update(1)
                    if cfg.name == "patched":
                        patched_params[cfg.variant] = out["settings"].get("iceformer")
                    if rep < 0:
                        continue
                    runs.append({"length": n, "config": cfg.name, "rep": rep, "prompt_tokens": out["prompt_tokens"],
                                 "generated_tokens": out["generated_tokens"],
                                 "prefill_seconds": out["prefill_seconds"], "decode_seconds": out["decode_seconds"],
                                 "prefill": out[_RATE_KEY["prefill"]], "decode": out[_RATE_KEY["decode"]],
                                 **({"variant": cfg.variant} if cfg.variant is not None else {})})
        finally:
            bar.close()
    labels = [label for label, _ in variants]
    return {"runs": runs, "rows": aggregate(runs, lengths, stock_flash, labels), "patched_params": patched_params}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["length"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    # one series per patched setting: "patched" alone, or each --variant's label
    settings = list(rows[0]["variants"]) if rows and rows[0].get("variants") else [None]

    def patched_of(r, label):
        return r["variants"][label] if label is not None else r

    for ax, metric in zip(axes[:2], METRICS):
        series = [("stock (faster fa)", lambda r: r["baseline"][metric], "o-")]
        series += [(label or "patched", lambda r, label=label: patched_of(r, label)["patched"][metric], "s-")
                   for label in settings]
        for label, get, style in series:
            pts = [(xx, get(r)) for xx, r in zip(x, rows) if get(r)]
            if not pts:
                continue
            med = [s["median"] for _, s in pts]
            err = [[s["median"] - s["min"] for _, s in pts], [s["max"] - s["median"] for _, s in pts]]
            ax.errorbar([p[0] for p in pts], med, yerr=err, fmt=style, capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{metric} speed")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[2]
    for label in settings:
        for metric, style in zip(METRICS, ("o-", "s-")):
            pts = [(xx, patched_of(r, label)["ratio"][metric]) for xx, r in zip(x, rows)]
            pts = [p for p in pts if p[1] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                        label=f"{metric}, {label}" if label is not None else metric)
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("patched / stock (medians)")
    ax.set_title("speed ratio")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"{Path(result['model']).name}, {result['threads']} threads, attention={result['patched']['attention']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Command


def cmd_bench(args) -> int:
    from ..runtime.models import check_gguf, resolve_model
    from ..runtime.settings import default_attention, from_arguments

    attention = args.attention or default_attention("patched")  # the patched side's; stock runs dense
    model = str(resolve_model(args.model))
    info = check_gguf(model)
    lengths = cap_lengths(args.lengths, info.context_length)
    if not lengths:
        raise UsageError(f"no length in {args.lengths} fits the model's trained context of {info.context_length} tokens")
    if len(lengths) < len(args.lengths):
        print(f"note: lengths above the trained context ({info.context_length}) skipped", file=sys.stderr)
    threads = args.threads or os.cpu_count() or 1
    stock_flash = ["on", "off"] if args.stock_flash_attn == "both" else [args.stock_flash_attn]
    settings = from_arguments(args)
    if args.variant:
        from .evaluate import build_variants

        if attention != "iceformer":
            raise UsageError("--variant compares IceFormer settings; it needs --attention iceformer")
        try:
            variants = build_variants(settings, args.variant)
        except ValueError as e:
            raise UsageError(f"bad --variant: {e}") from None
    else:
        variants = [(None, settings)]
    from ..runtime.calibration import profile_for

    profile = profile_for(model) if attention == "iceformer" else None   # what the speed levels run
    started = time.time()
    measured = run_bench(model=model, lengths=lengths, repeat=args.repeat, threads=threads,
                         n_predict=args.n_predict, batch_size=args.batch_size, attention=attention,
                         variants=variants, flash_attn=args.flash_attn, stock_flash=stock_flash,
                         timeout=args.timeout, progress=sys.stderr.isatty(), warmup=args.warmup)
    params = measured["patched_params"]
    result = {
        "command": "python -m iceformer_llama " + shlex.join(sys.argv[1:]),
        "model": model, "model_name": info.name, "context_length": info.context_length,
        "calibration_profile": str(profile.path) if profile else None,
        "lengths": lengths, "repeat": args.repeat, "warmup_rounds": args.warmup, "threads": threads,
        "n_predict": args.n_predict, "batch_size": args.batch_size,
        "patched": {"attention": attention, "flash_attn": args.flash_attn, "knobs": settings.overrides(),
                    "params": params.get(variants[0][0])},
        **({"variants": [{"label": label, "knobs": s.overrides(), "params": params.get(label)}
                         for label, s in variants]} if args.variant else {}),
        "stock": {"flash_attn": stock_flash},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "rows": measured["rows"], "runs": measured["runs"],
    }
    print(format_table(result["rows"]))
    write_results(result, args.out, plot)
    return 0


def register(subparsers) -> None:
    """Adds the `bench` subcommand."""
    from ..runtime.options import non_negative, positive
    from ..runtime.settings import add_arguments
    from .evaluate import variant_argument

    p = subparsers.add_parser("bench", help="prefill/decode tokens/s, patched against stock llama.cpp",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--model", "-m", default=None, help="GGUF path, alias or REPO_ID:FILENAME (default: bundled model)")
    p.add_argument("--lengths", type=parse_lengths, default=list(DEFAULT_LENGTHS),
                   help="comma-separated prompt lengths in tokens, capped at the model's trained context "
                        f"(default {','.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--repeat", type=positive, default=3, help="measured runs per length and build (default 3)")
    p.add_argument("--warmup", type=non_negative, default=1,
                   help="discarded rounds before measuring, at the first length (default 1)")
    p.add_argument("--threads", "-t", type=positive, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--batch-size", "-b", type=positive, default=512, help="prompt tokens per ubatch (default 512)")
    p.add_argument("-n", "--n-predict", type=positive, default=32, help="tokens decoded per run (default 32)")
    p.add_argument("--flash-attn", choices=("on", "off", "auto"), default="auto",
                   help="flash attention of the patched build's dense layers (default auto)")
    p.add_argument("--stock-flash-attn", choices=("both", "on", "off"), default="both",
                   help="stock runs: both (default; the faster per length is the baseline), on or off")
    p.add_argument("--timeout", type=positive, default=1800, help="seconds allowed per run (default 1800)")
    p.add_argument("--out", "-o", default="results/bench.json", help="JSON path; the PNG goes beside it")
    p.add_argument("--variant", action="append", type=variant_argument, metavar="KNOB=V,...",
                   help="a patched setting to run in the same rounds, on top of the knob flags (repeatable; "
                        "\"\" = the knob flags alone), e.g. --variant \"\" --variant dense_prefill=on")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
