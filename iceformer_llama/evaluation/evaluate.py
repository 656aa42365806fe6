"""`python -m iceformer_llama eval`: accuracy of IceFormer attention against dense, on one model, in one
process (patched backend), for one or more knob settings (`--variant`), so the output is a curve.

- Teacher-forced on documents of `--lengths` tokens: natural prose, code and copy-heavy text from the
  machine (sources.py: each source's licence, the tune/report split; `--classes`, `--docs`) and the
  user's own files (`--text-file`). Per setting, length and document: top-1 agreement of the next-token
  prediction, mean KL(dense || iceformer) and perplexity against dense, beside llama.cpp's own floor on
  the same positions (dense with flash attention flipped, `--rounding-floor`), a within-target flag
  (floor.py), each document's dense perplexity, and each mode's prefill time from the same run. Only
  the scored positions' logits are requested (logits.py).
- Passkey retrieval and LongEval-style line retrieval (`tasks.py`) at `--task-lengths` x `--depths`,
  `--trials` prompts each, seeded by `--seed`: plain greedy completion, exact match of the number;
  accuracy for dense and each setting, and the ratio.

    python -m iceformer_llama eval --variant top_blocks=8,block_size=32 --variant top_k=32 --out results/eval.json

Writes the JSON (`--out`) and a PNG beside it (eval_output.py): agreement against prefill speed-up,
each document's top-1 and perplexity beside the floor's, retrieval accuracy.
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
from .floor import PPL_TOLERANCE, TOP1_MARGIN
from .report import write_results
from .sources import CLASSES, SPLITS

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
    if kind is float:
        return float(value)
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
    scored = bool(docs)   # with the tasks alone there is no agreement or speed-up to state
    out = [{"mode": "dense", "top1_agreement": 1.0 if scored else None, "mean_kl": 0.0 if scored else None,
            "prefill_tokens_per_second": tokens / dense_s if dense_s else None,
            "prefill_speedup": 1.0 if scored else None,
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


# ------------------------------------------------------------------------------------------------
# Running


def task_seed(base: int, task: str, length: int, depth: float, trial: int) -> int:
    return random.Random(f"{base}:{task}:{length}:{depth}:{trial}").randrange(1 << 31)


def _open(args, ctx_size: int):
    """The patched model in dense attention; logits are requested per position (logits.py), never all."""
    from ..runtime.options import open_model

    ns = argparse.Namespace(**vars(args))
    ns.backend, ns.attention, ns.ctx_size, ns.seed = "patched", "dense", ctx_size, None
    return open_model(ns, logits_all=False)


def document_reference(llm, doc, first: int, *, bar, floor_llm=None) -> tuple:
    """One document's reference: (dense logits at its scored positions from `first`, dense prefill seconds,
    its own figures). The figures: dense perplexity and, with floor_llm (dense, flash attention flipped),
    how far llama.cpp's two exact kernels are from each other on the same positions, the floor under a
    setting's figures."""
    from .accuracy import RowStats, against, dense_rows
    from .floor import floor_figures

    tokens = doc.tokens
    dense, dense_s = dense_rows(llm, tokens, first)
    bar.update(1)
    floor = None
    if floor_llm is not None:
        floor_llm.set_attention("dense")
        stats, _ = against(floor_llm, tokens, first, dense)
        floor = floor_figures(stats)
        bar.update(1)
    else:
        stats = RowStats()
        stats.add(dense, dense, tokens[first + 1:])
    text = {**doc.describe(), "licence": doc.licence, "first_position": first, "ppl_dense": stats.ppl_ref,
            "prefill_seconds_dense": dense_s, "floor": floor}
    return dense, dense_s, text


def run_documents(llm, documents, variants, *, score_from: float, bar, floor_llm=None) -> tuple[list[dict], list[dict]]:
    """Each variant against dense on each document (records), and each document's own figures (texts,
    see document_reference)."""
    from .accuracy import compare
    from .floor import document_record

    records, texts = [], []
    for doc in documents:
        n = len(doc.tokens)
        first = min(int(score_from * n), n - 2)
        dense, dense_s, text = document_reference(llm, doc, first, bar=bar, floor_llm=floor_llm)
        texts.append(text)
        for label, settings in variants:
            stats, ice_s = compare(llm, doc.tokens, settings, dense, first=first)
            records.append(document_record(label, doc.describe(), first, stats, dense_s, ice_s, text["floor"]))
            bar.update(1)
        del dense
    return records, texts


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


def corpus_documents(llm, lengths, args) -> tuple[list, dict]:
    """The documents to score at each length (catalogue sources of --classes/--docs, then --text-file
    files) and the corpus manifest for the JSON: sources, licences, what was skipped or missing."""
    from . import documents as D

    prepared = D.catalogue() if args.classes else ()
    chosen = D.select(prepared, args.classes, args.docs, args.docs_per_class)
    missing = [p for p in prepared if p.text is None and p.source.klass in args.classes
               and (args.docs == "all" or p.source.split == args.docs)]
    docs, skipped = [], []
    for n in lengths:
        found, short = D.documents_at(llm, n, chosen)
        docs += found
        skipped += short
        docs += D.text_file_documents(llm, args.text_file or [], n)
    manifest = {"classes": args.classes, "docs": args.docs, "docs_per_class": args.docs_per_class,
                "sources": [p.as_dict() for p in chosen + missing], "text_files": list(args.text_file or []),
                "skipped": skipped, "about": "iceformer_llama/evaluation/sources.py and documents.py"}
    return docs, manifest


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from ..runtime.calibration import profile_for
    from ..runtime.models import check_gguf, resolve_model
    from ..runtime.settings import from_arguments
    from .documents import read_text_file
    from .eval_output import format_report, plot
    from .floor import class_summary
    from .tasks import TASKS

    model = str(resolve_model(args.model))
    info = check_gguf(model)
    cap = info.context_length or 1 << 30
    if args.classes is None:
        args.classes = [] if args.text_file else list(CLASSES)
    # --classes none with no --text-file: no document to score, the tasks alone
    lengths = [n for n in args.lengths if n <= cap] if args.classes or args.text_file else []
    task_lengths = [n for n in (args.task_lengths or args.lengths) if n <= cap]
    tasks = [] if args.tasks == ["none"] else args.tasks
    if set(tasks) - set(TASKS):
        raise UsageError(f"unknown task in --tasks {','.join(tasks)}: choose from {', '.join(TASKS)} or none")
    if not lengths and not (tasks and task_lengths):
        raise UsageError("nothing to evaluate: no document (--classes, --text-file) or task (--tasks) within the "
                         f"model's trained context ({info.context_length} tokens)")
    for path in args.text_file or []:
        read_text_file(path)
    try:
        variants = build_variants(from_arguments(args), list(args.settings or []) + list(args.variant or []))
    except (ValueError, TypeError) as e:
        raise UsageError(f"bad --variant/--settings: {e}") from None
    args.model = model
    profile = profile_for(model)   # what the speed levels run (None: settings.SPEED_LEVELS)
    seed = 0 if args.seed is None else args.seed
    started = time.time()
    progress = sys.stderr.isatty()
    docs, texts, records, manifest = [], [], [], {}
    with contextlib.ExitStack() as stack:
        llm = floor_llm = documents = None
        if lengths:
            llm = stack.enter_context(_open(args, max(lengths) + _CTX_SLACK))
            documents, manifest = corpus_documents(llm, lengths, args)
            if not documents:
                raise UsageError(f"no document of {','.join(map(str, lengths))} tokens in --classes "
                                 f"{','.join(args.classes) or 'none'} (--docs {args.docs}): choose shorter --lengths")
            if args.rounding_floor == "on":
                flipped = argparse.Namespace(**vars(args))
                flipped.flash_attn = "off" if args.flash_attn != "off" else "on"
                floor_llm = stack.enter_context(_open(flipped, max(lengths) + _CTX_SLACK))
        total = (len(documents or []) * (1 + len(variants) + int(floor_llm is not None))
                 + len(tasks) * len(task_lengths) * len(args.depths) * args.trials * (1 + len(variants)))
        with tqdm(total=total, desc="eval", unit="run", file=sys.stderr, disable=not progress) as bar:
            if documents:
                docs, texts = run_documents(llm, documents, variants, score_from=args.score_from, bar=bar,
                                            floor_llm=floor_llm)
            stack.close()  # the document models go before the task model opens
            if tasks and task_lengths:
                with _open(args, max(task_lengths) + args.n_predict + _CTX_SLACK) as llm:
                    records = run_tasks(llm, tasks, task_lengths, args.depths, args.trials, variants, seed=seed,
                                        n_predict=args.n_predict, bar=bar)
    labels = [label for label, _ in variants]
    threads = args.threads or os.cpu_count() or 1
    result = {
        "command": "python -m iceformer_llama " + shlex.join(sys.argv[1:]),
        "model": model, "model_name": info.name, "context_length": info.context_length,
        "calibration_profile": str(profile.path) if profile else None,
        "corpus": manifest,
        "threads": threads, "flash_attn": args.flash_attn, "batch_size": args.batch_size,
        "lengths": lengths, "score_from": args.score_from,
        "targets": {"ppl_tolerance": PPL_TOLERANCE, "top1_margin": TOP1_MARGIN},
        "task_lengths": task_lengths if tasks else [], "depths": args.depths, "trials": args.trials, "seed": seed,
        "n_predict": args.n_predict, "tasks": tasks,
        "variants": [{"label": label, "knobs": s.overrides()} for label, s in variants],
        "texts": texts, "documents": docs,
        "rounding_floor": [{"n_tokens": t["n_tokens"], "document": t["document"], "first_position": t["first_position"],
                            "ppl_dense": t["ppl_dense"], **t["floor"]} for t in texts if t["floor"]],
        "class_summary": class_summary(docs, labels),
        "task_summary": task_summary(records, labels),
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


def _classes(text: str) -> list[str]:
    from .documents import check_classes

    try:
        return check_classes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    p.add_argument("--classes", type=_classes, default=None, metavar="CLASS,...",
                   help=f"document classes: {','.join(CLASSES)}, all or none (default all; none with --text-file)")
    p.add_argument("--docs", choices=SPLITS + ("all",), default="report",
                   help="which documents of each class: the tune set (to choose settings on), the report set "
                        "(to report them on) or all (default report)")
    p.add_argument("--docs-per-class", type=positive, default=None, metavar="N",
                   help="only the first N documents of each class (default all)")
    p.add_argument("--text-file", action="append", default=None, metavar="FILE",
                   help="also score this UTF-8 file's first --lengths tokens, as written (repeatable)")
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
