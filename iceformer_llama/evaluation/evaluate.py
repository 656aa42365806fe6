"""`python -m iceformer_llama eval`: accuracy of IceFormer attention against dense, on one model, in one
process (patched backend), for one or more knob settings (`--variant`), so the output is a curve.

- Teacher-forced on corpus documents (`--lengths`): top-1 agreement of the next-token prediction, mean
  KL(dense || iceformer), both perplexities, and each mode's prefill time from the same run.
- Passkey retrieval and LongEval-style line retrieval (`tasks.py`) at `--task-lengths` x `--depths`,
  `--trials` prompts each, seeded by `--seed`: plain greedy completion, exact match of the number;
  accuracy for dense and each setting, and the ratio.

    python -m iceformer_llama eval --variant top_blocks=8,block_size=32 --variant top_k=32 --out results/eval.json

Writes the JSON (`--out`) and a PNG beside it: accuracy against prefill speed-up, one point per setting.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

from ..errors import UsageError
from ..runtime.settings import IceformerSettings
from .corpus import SOURCE as corpus_source
from .report import write_results

DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
_CTX_SLACK = 16


# ------------------------------------------------------------------------------------------------
# Settings variants


def _field_names() -> dict[str, dataclasses.Field]:
    """Accepted knob names: the field names and the CLI flag names (top_k, top-k, sinks, dci-l, ...)."""
    names = {}
    for f in dataclasses.fields(IceformerSettings):
        names[f.name] = f
        names[f.metadata["flag"].lstrip("-").replace("-", "_")] = f
    return names


def _knob_value(f: dataclasses.Field, value):
    kind = f.metadata["kind"]
    if kind in ("layers", "budgets"):
        if isinstance(value, str):
            value = [int(x) for x in value.replace("+", ";").split(";") if x.strip() and x.strip() != "none"]
        return tuple(int(x) for x in value)
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("on", "true", "1", "yes"):
                return True
            if value.lower() in ("off", "false", "0", "no"):
                return False
            raise ValueError(f"{f.name} takes on or off, got {value!r}")
        return bool(value)
    return int(value)


def variant_overrides(spec) -> dict:
    """`top_blocks=8,block_size=32` (or a dict) -> {"top_blocks": 8, "block_size": 32}.

    Names are IceformerSettings fields or their flags (top-k, sinks, dci-l); dense_layers separates
    layers with '+' (`dense_layers=0+1`), and so does layer_budget (`layer_budget=100+150`)."""
    if isinstance(spec, str):
        pairs = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            if "=" not in item:
                raise ValueError(f"expected knob=value, got {item!r}")
            key, value = item.split("=", 1)
            pairs[key.strip()] = value.strip()
        spec = pairs
    if not isinstance(spec, dict):
        raise ValueError(f"a setting is knob=value pairs or a JSON object, got {spec!r}")
    names = _field_names()
    out = {}
    for key, value in spec.items():
        f = names.get(str(key).replace("-", "_"))
        if f is None:
            raise ValueError(f"unknown knob {key!r}; knobs: {', '.join(f.name for f in dataclasses.fields(IceformerSettings))}")
        try:
            out[f.name] = _knob_value(f, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad value for {key}: {value!r} ({e})") from None
    return out


def label_of(overrides: dict) -> str:
    if not overrides:
        return "default"
    parts = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        elif isinstance(value, tuple):
            value = "+".join(map(str, value)) or "none"
        parts.append(f"{key}={value}")
    return ",".join(parts)


def build_variants(base: IceformerSettings, specs: list) -> list[tuple[str, IceformerSettings]]:
    """(label, settings) for each spec on top of the base settings; the base alone when there are none."""
    if not specs:
        return [(label_of(base.overrides()), base)]
    variants, seen = [], set()
    for spec in specs:
        over = variant_overrides(spec)
        settings = dataclasses.replace(base, **over)
        label = label_of(over) if over else label_of(base.overrides())
        if label in seen:
            continue
        seen.add(label)
        variants.append((label, settings))
    return variants


def _load_settings_list(text: str) -> list:
    """--settings: a JSON list of objects, inline or in a file."""
    path = Path(text)
    try:
        raw = path.read_text() if not text.lstrip().startswith("[") and path.is_file() else text
        value = json.loads(raw)
    except (OSError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"--settings needs a JSON list of objects or a file holding one ({e})") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise argparse.ArgumentTypeError("--settings needs a JSON list of objects")
    return value


# ------------------------------------------------------------------------------------------------
# Pure summaries


def accuracy(records: list[dict], mode: str) -> float | None:
    """Fraction of task records that `mode` (dense or a variant label) answered correctly."""
    hits = [r["results"][mode]["correct"] for r in records if mode in r["results"]]
    return sum(hits) / len(hits) if hits else None


def task_summary(records: list[dict], labels: list[str]) -> list[dict]:
    """Accuracy per task and length for dense and each variant, with variant/dense ratios."""
    rows = []
    for task in sorted({r["task"] for r in records}):
        for length in sorted({r["length"] for r in records if r["task"] == task}):
            at = [r for r in records if r["task"] == task and r["length"] == length]
            dense = accuracy(at, "dense")
            row = {"task": task, "length": length, "n": len(at), "dense": dense, "variants": {}}
            for label in labels:
                acc = accuracy(at, label)
                row["variants"][label] = {"accuracy": acc, "ratio": (acc / dense) if dense and acc is not None else None}
            rows.append(row)
    return rows


def overall_summary(docs: list[dict], records: list[dict], labels: list[str]) -> list[dict]:
    """One line per mode (dense, then each variant): mean agreement/KL over documents, prefill tokens/s
    and speed-up over all documents, task accuracies over all prompts."""
    def tasks_for(mode):
        return {t: accuracy([r for r in records if r["task"] == t], mode) for t in sorted({r["task"] for r in records})}

    tokens = sum(d["n_tokens"] for d in docs if d["variant"] == (labels[0] if labels else None))
    dense_s = sum(d["prefill_seconds_dense"] for d in docs if d["variant"] == (labels[0] if labels else None))
    out = [{"mode": "dense", "top1_agreement": 1.0, "mean_kl": 0.0,
            "prefill_tokens_per_second": tokens / dense_s if dense_s else None, "prefill_speedup": 1.0,
            "tasks": tasks_for("dense")}]
    for label in labels:
        mine = [d for d in docs if d["variant"] == label]
        ice_s = sum(d["prefill_seconds_iceformer"] for d in mine)
        dense_mine = sum(d["prefill_seconds_dense"] for d in mine)
        tasks = tasks_for(label)
        out.append({
            "mode": label,
            "top1_agreement": sum(d["top1_agreement"] for d in mine) / len(mine) if mine else None,
            "mean_kl": sum(d["mean_kl"] for d in mine) / len(mine) if mine else None,
            "prefill_tokens_per_second": sum(d["n_tokens"] for d in mine) / ice_s if ice_s else None,
            "prefill_speedup": dense_mine / ice_s if ice_s else None,
            "tasks": tasks,
            "task_ratio": {t: (a / out[0]["tasks"][t]) if a is not None and out[0]["tasks"].get(t) else None
                           for t, a in tasks.items()},
        })
    return out


def _f(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _table(head, rows) -> str:
    lines = [tuple(head)] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_report(result: dict) -> str:
    parts = []
    if result["documents"]:
        parts.append("teacher-forced, positions from " + f"{result['score_from']:.0%} of each document")
        parts.append(_table(
            ("length", "setting", "top-1", "KL", "ppl dense", "ppl ice", "dense tok/s", "ice tok/s", "speed-up"),
            [(d["n_tokens"], d["variant"], _f(d["top1_agreement"]), _f(d["mean_kl"], ".4f"), _f(d["ppl_dense"], ".2f"),
              _f(d["ppl_iceformer"], ".2f"), _f(d["n_tokens"] / d["prefill_seconds_dense"], ".1f"),
              _f(d["n_tokens"] / d["prefill_seconds_iceformer"], ".1f"),
              _f(d["prefill_seconds_dense"] / d["prefill_seconds_iceformer"], ".2f") + "x")
             for d in result["documents"]]))
    fa = "off" if result["flash_attn"] != "off" else "on"
    for f in result.get("rounding_floor", []):
        parts.append(f"rounding floor at {f['n_tokens']}: dense with flash attention {fa} agrees with dense at "
                     f"top-1 {f['top1_agreement']:.3f}, KL {f['mean_kl']:.4f}")
    if result["task_summary"]:
        labels = [v["label"] for v in result["variants"]]
        parts.append("\nretrieval accuracy (exact match), dense | each setting (ratio to dense)")
        parts.append(_table(("task", "length", "n", "dense", *labels),
                            [(r["task"], r["length"], r["n"], _f(r["dense"], ".2f"),
                              *(f"{_f(r['variants'][l]['accuracy'], '.2f')} ({_f(r['variants'][l]['ratio'], '.2f')})"
                                for l in labels)) for r in result["task_summary"]]))
    tasks = sorted({t for s in result["summary"] for t in s["tasks"]})
    parts.append("\nsummary")
    parts.append(_table(("setting", "top-1", "KL", "prefill tok/s", "speed-up", *tasks),
                        [(s["mode"], _f(s["top1_agreement"]), _f(s["mean_kl"], ".4f"),
                          _f(s["prefill_tokens_per_second"], ".1f"), _f(s["prefill_speedup"], ".2f") + "x",
                          *(_f(s["tasks"].get(t), ".2f") for t in tasks)) for s in result["summary"]]))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Running


def task_seed(base: int, task: str, length: int, depth: float, trial: int) -> int:
    return random.Random(f"{base}:{task}:{length}:{depth}:{trial}").randrange(1 << 31)


def _open(args, ctx_size: int, *, logits_all: bool):
    from ..runtime.options import open_model

    ns = argparse.Namespace(**vars(args))
    ns.backend, ns.attention, ns.ctx_size, ns.seed = "patched", "dense", ctx_size, None
    return open_model(ns, logits_all=logits_all)


def agreement(a, b, first: int) -> tuple[float, float]:
    """(top-1 agreement, mean KL(a || b)) of two logit arrays (positions x vocab) over rows [first, n-1)."""
    from .accuracy import compare_logits

    agree, kl, _, _ = compare_logits(a, b, first)
    return agree, kl


def run_documents(llm, lengths, variants, *, score_from: float, bar, floor_llm=None) -> tuple[list[dict], list[dict]]:
    """Each variant against dense on each document; with floor_llm (dense, flash attention flipped), also
    how far llama.cpp's two dense kernels are from each other: the rounding floor of these metrics."""
    from .accuracy import compare, dense_reference
    from .corpus import document_tokens

    docs, floor = [], []
    for n in lengths:
        tokens = document_tokens(llm, n)
        dense, dense_s = dense_reference(llm, tokens)
        bar.update(1)
        first = min(int(score_from * n), n - 2)
        if floor_llm is not None:
            other, _ = dense_reference(floor_llm, tokens)
            top1, kl = agreement(dense, other, first)
            floor.append({"n_tokens": n, "first_position": first, "top1_agreement": top1, "mean_kl": kl})
            del other
            bar.update(1)
        for label, settings in variants:
            c = compare(llm, tokens, settings, dense, dense_s, first_position=first)
            docs.append({"variant": label, **c.as_dict()})
            bar.update(1)
        del dense
    return docs, floor


def run_tasks(llm, tasks, lengths, depths, trials: int, variants, *, seed: int, n_predict: int, bar) -> list[dict]:
    from ..runtime.generate import generate
    from .tasks import make_task

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=True))

    records = []
    for task in tasks:
        for n in lengths:
            for depth in depths:
                for trial in range(trials):
                    t = make_task(task, n, depth=depth, seed=task_seed(seed, task, n, depth, trial), count_tokens=count)
                    rec = {"task": task, "length": n, "depth": depth, "trial": trial, **t.as_dict(), "results": {}}
                    for mode, settings in [("dense", None), *variants]:
                        llm.set_attention("dense" if settings is None else "iceformer", settings)
                        out = generate(llm, t.prompt, n_predict=n_predict, temperature=0.0)
                        rec["results"][mode] = {"output": out.text, "correct": t.is_correct(out.text),
                                                "prefill_seconds": round(out.prefill_seconds, 4)}
                        bar.update(1)
                    records.append(rec)
    return records


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    variants = [s for s in summary if s["mode"] != "dense"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    number = {s["mode"]: str(i + 1) for i, s in enumerate(variants)}
    ax = axes[0]
    for n in sorted({d["n_tokens"] for d in result["documents"]}):
        pts = sorted((d["prefill_seconds_dense"] / d["prefill_seconds_iceformer"], d["top1_agreement"], d["variant"])
                     for d in result["documents"] if d["n_tokens"] == n)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{n} tokens")
        for x, y, label in pts:
            ax.annotate(number[label], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    floor = result.get("rounding_floor") or []
    if floor:
        ax.axhline(sum(f["top1_agreement"] for f in floor) / len(floor), color="grey", lw=1, ls=":",
                   label="dense vs dense, flash attention flipped")
    ax.axvline(1.0, color="grey", lw=1, ls="--")
    ax.set_xlabel("prefill speed-up over dense (same run)")
    ax.set_ylabel("top-1 agreement with dense")
    ax.set_title("teacher-forced agreement")
    ax.grid(alpha=0.3)
    if result["documents"]:
        ax.legend(fontsize=8)
    ax = axes[1]
    tasks = sorted({t for s in summary for t in s["tasks"]})
    for task, style in zip(tasks, ("o-", "s-", "^-")):
        pts = sorted((s["prefill_speedup"], s["tasks"][task]) for s in variants
                     if s["prefill_speedup"] is not None and s["tasks"].get(task) is not None)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{task} (iceformer)")
        for s in variants:
            if s["prefill_speedup"] is not None and s["tasks"].get(task) is not None:
                ax.annotate(number[s["mode"]], (s["prefill_speedup"], s["tasks"][task]), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
        dense = summary[0]["tasks"].get(task)
        if dense is not None:
            ax.axhline(dense, color=line.get_color(), lw=1, ls="--", label=f"{task} (dense)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prefill speed-up over dense (documents)")
    ax.set_ylabel("retrieval accuracy")
    ax.set_title("passkey / line retrieval")
    ax.grid(alpha=0.3)
    if tasks:
        ax.legend(fontsize=8)
    legend = "\n".join(f"{i + 1}: {s['mode']}" for i, s in enumerate(variants))
    fig.text(0.01, 0.01, legend, fontsize=7, va="bottom")
    fig.suptitle(f"{Path(result['model']).name}: IceFormer settings, accuracy against speed")
    fig.tight_layout(rect=(0, 0.04 + 0.02 * len(variants), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from ..runtime.models import check_gguf, resolve_model
    from ..runtime.settings import from_arguments
    from .tasks import TASKS

    model = str(resolve_model(args.model))
    info = check_gguf(model)
    cap = info.context_length or 1 << 30
    lengths = [n for n in args.lengths if n <= cap]
    task_lengths = [n for n in (args.task_lengths or args.lengths) if n <= cap]
    tasks = [] if args.tasks == ["none"] else args.tasks
    if set(tasks) - set(TASKS):
        raise UsageError(f"unknown task in --tasks {','.join(tasks)}: choose from {', '.join(TASKS)} or none")
    if not lengths and not (tasks and task_lengths):
        raise UsageError(f"nothing to evaluate within the model's trained context ({info.context_length} tokens)")
    try:
        variants = build_variants(from_arguments(args), list(args.settings or []) + list(args.variant or []))
    except (ValueError, TypeError) as e:
        raise UsageError(f"bad --variant/--settings: {e}") from None
    args.model = model
    seed = 0 if args.seed is None else args.seed
    started = time.time()
    progress = sys.stderr.isatty()
    total = len(lengths) * (1 + len(variants) + int(args.rounding_floor == "on")) + len(tasks) * len(task_lengths) * len(args.depths) * args.trials * (1 + len(variants))
    docs, records, floor = [], [], []
    with tqdm(total=total, desc="eval", unit="run", file=sys.stderr, disable=not progress) as bar:
        if lengths:
            with contextlib.ExitStack() as stack:
                llm = stack.enter_context(_open(args, max(lengths) + _CTX_SLACK, logits_all=True))
                floor_llm = None
                if args.rounding_floor == "on":
                    flipped = argparse.Namespace(**vars(args))
                    flipped.flash_attn = "off" if args.flash_attn != "off" else "on"
                    floor_llm = stack.enter_context(_open(flipped, max(lengths) + _CTX_SLACK, logits_all=True))
                docs, floor = run_documents(llm, lengths, variants, score_from=args.score_from, bar=bar,
                                            floor_llm=floor_llm)
        if tasks and task_lengths:
            with _open(args, max(task_lengths) + args.n_predict + _CTX_SLACK, logits_all=False) as llm:
                records = run_tasks(llm, tasks, task_lengths, args.depths, args.trials, variants, seed=seed,
                                    n_predict=args.n_predict, bar=bar)
    labels = [label for label, _ in variants]
    threads = args.threads or os.cpu_count() or 1
    result = {
        "command": "python -m iceformer_llama " + shlex.join(sys.argv[1:]),
        "model": model, "model_name": info.name, "context_length": info.context_length,
        "corpus": corpus_source,
        "threads": threads, "flash_attn": args.flash_attn, "batch_size": args.batch_size,
        "lengths": lengths, "score_from": args.score_from,
        "task_lengths": task_lengths if tasks else [], "depths": args.depths, "trials": args.trials, "seed": seed,
        "n_predict": args.n_predict, "tasks": tasks,
        "variants": [{"label": label, "knobs": s.overrides()} for label, s in variants],
        "documents": docs, "rounding_floor": floor, "task_summary": task_summary(records, labels),
        "summary": overall_summary(docs, records, labels), "task_records": records,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
    }
    print(format_report(result))
    write_results(result, args.out, plot)
    return 0


def _fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in [0, 1], got {text!r}")
    return values


def _fraction(text: str) -> float:
    values = _fractions(text)
    if len(values) != 1 or values[0] >= 1.0:
        raise argparse.ArgumentTypeError(f"expected one fraction in [0, 1), got {text!r}")
    return values[0]


def variant_argument(text: str) -> str:
    try:
        variant_overrides(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def register(subparsers) -> None:
    """Adds the `eval` subcommand."""
    from ..runtime.options import positive
    from ..runtime.settings import add_arguments
    from .bench import parse_lengths

    p = subparsers.add_parser("eval", help="accuracy of IceFormer against dense: agreement, KL, perplexity, "
                                           "passkey and line retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "-m", default=None, help="GGUF path, alias or REPO_ID:FILENAME (default: bundled model)")
    p.add_argument("--lengths", type=parse_lengths, default=list(DEFAULT_LENGTHS),
                   help=f"document lengths in tokens (default {','.join(map(str, DEFAULT_LENGTHS))}); "
                        "capped at the trained context")
    p.add_argument("--score-from", type=_fraction, default=0.5,
                   help="score positions from this fraction of each document on, where the context is long "
                        "(default 0.5)")
    p.add_argument("--tasks", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=["passkey", "lines"], help="passkey,lines (default both) or none")
    p.add_argument("--task-lengths", type=parse_lengths, default=None, help="task prompt lengths (default: --lengths)")
    p.add_argument("--depths", type=_fractions, default=list(DEFAULT_DEPTHS),
                   help="needle depths, 0 = start (default 0.1,0.5,0.9)")
    p.add_argument("--trials", type=positive, default=2, help="prompts per task, length and depth (default 2)")
    p.add_argument("--seed", type=int, default=None, help="seed of the generated tasks (default 0)")
    p.add_argument("-n", "--n-predict", type=positive, default=8, help="tokens generated per answer (default 8)")
    p.add_argument("--variant", action="append", type=variant_argument, metavar="KNOB=V,...",
                   help="a setting to evaluate, on top of the knob flags (repeatable), e.g. top_blocks=8,block_size=32")
    p.add_argument("--settings", type=_load_settings_list, default=None, metavar="JSON",
                   help='a JSON list of settings (or a file holding one), e.g. \'[{"top_k": 32}, {"top_blocks": 8}]\'')
    p.add_argument("--threads", "-t", type=positive, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--batch-size", "-b", type=positive, default=512, help="prompt tokens per ubatch (default 512)")
    p.add_argument("--flash-attn", choices=("on", "off", "auto"), default="auto",
                   help="flash attention in dense attention (default auto)")
    p.add_argument("--rounding-floor", choices=("on", "off"), default="on", type=str.lower,
                   help="also compare dense with flash attention flipped: how far llama.cpp's own two dense "
                        "kernels differ, the floor under the agreement and KL numbers (default on)")
    p.add_argument("--out", "-o", default="results/eval.json", help="JSON path; the PNG goes beside it")
    add_arguments(p)  # the knob flags: the base every --variant starts from (--attention is not used)
    p.set_defaults(func=cmd_eval)
