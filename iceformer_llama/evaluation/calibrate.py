"""`python -m iceformer_llama calibrate`: per-model speed levels that keep their accuracy promises.

For one model, teacher-forced on documents of `--lengths` tokens (eval's corpus: `--docs tune` by
default, so `eval --docs report` reports on text calibration never saw; or the user's `--text-file`s),
it measures the rungs of LADDER against dense attention and beside llama.cpp's own floor (dense with
flash attention flipped) on the same positions, the last `--positions` of each document. The ladder has
two families, each from the cheapest rung to the most exact: blocks chosen together by the query heads
of a GQA group (the library default) and blocks chosen by each query head (group_blocks off: fewer keys
for the same accuracy, more work per key). A family stops once a rung meets the tightest promise (level
1) on every document; the per-head family also stops once a rung's prefill is slower than the grouped
family's most exact rung measured, since no later rung of it could be the fastest for any level. With
--layer-shape on (the default) it first measures each layer's sensitivity (layer_shape.py: one pass per
layer on one document per class) and every rung then gives each layer a share of its block budget
(layer_budget) that grows with the layer's sensitivity, the mean share 100%. Every rung also keeps,
past the longest length calibrated, the share of the blocks it attends there (block_share, hold_share). Each
speed level then gets the fastest rung (by measured prefill time) among each family's cheapest rung that
meets its promise (settings.LEVEL_PROMISES: perplexity vs dense, top-1 vs the floor) on EVERY document; a
level no rung meets gets the most exact grouped rung, marked `meets: false`. The result is the model's
profile (runtime/calibration.py), keyed by the file's content and used from then on by generate, chat,
serve, bench, eval and the Llama class.

The dense reference rows of every document are kept while the rungs run: documents x positions x
vocabulary x 4 bytes (5 tune documents at two lengths, 512 positions and a 152k vocabulary: 3 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import sys
import time

from ..errors import UsageError
from ..runtime.settings import LEVEL_PROMISES, SPEED_LEVELS, IceformerSettings, describe_promise
from .floor import aggregate, within_target
from .sources import CLASSES, SPLITS

DEFAULT_LENGTHS = (4096, 8192)
DEFAULT_POSITIONS = 512


def _rung(top_blocks: int, window: int, group_blocks: bool = True) -> dict:
    return {"block_size": 16, "top_blocks": top_blocks, "window": window, "block_share": 0.0, "layer_budget": (),
            "group_blocks": group_blocks}


# Candidate settings: IceformerSettings field values, every rung naming the same knobs (a knob a rung
# leaves out keeps the library default, never a profile's value). Two families (by group_blocks), each
# from the cheapest to the most exact. Blocks chosen per query head keep the accuracy target with about
# 40% of the keys where the grouped choice needs 66-77% (docs/accuracy-natural.md, eighth session), so
# that family starts lower; on models without GQA the two are the same and only the first runs.
GROUPED: list[dict] = [_rung(b, 64) for b in (10, 20, 30, 40, 60, 80)] + [_rung(b, 128) for b in (120, 160, 240, 320)]
PER_HEAD: list[dict] = [_rung(b, 64, False) for b in (20, 40, 60)] + [_rung(b, 128, False)
                                                                      for b in (80, 120, 160, 200, 240)]
LADDER: list[dict] = GROUPED + PER_HEAD

# The cheap setting each layer runs alone (the others exact) to measure where the error comes from
# (layer_shape.py): about a fifth of the keys at 4k, where every layer's error shows.
SHAPE_KNOBS: dict = _rung(40, 64)


def hold_share(ladder: list[dict], length: int) -> list[dict]:
    """The rungs with block_share set to the share of an n_kv = `length` context's blocks that each attends
    (rounded down), so a budget measured enough at the longest length calibrated keeps that share of the
    keys on longer prompts; up to that length top_blocks is the larger and the rung runs as measured."""
    return [{**rung, "block_share": min(1.0, math.floor(rung["top_blocks"] / max(1, length // rung["block_size"])
                                                        * 10_000) / 10_000)} for rung in ladder]


# ------------------------------------------------------------------------------------------------
# Choosing levels (pure)


def meets(records: list[dict] | None, level: int) -> bool:
    """One rung's per-document records (floor.document_record) all keep the level's promise."""
    return bool(records) and all(within_target(r["top1_agreement"], r["ppl_vs_dense"], r["floor"],
                                               **LEVEL_PROMISES[level]) for r in records)


def families(ladder: list[dict]) -> list[list[int]]:
    """The ladder's rung indices by family (group_blocks), in ladder order; the first family is the one the
    first rung belongs to (the fallback for a level no rung meets)."""
    out: dict = {}
    for i, rung in enumerate(ladder):
        out.setdefault(rung.get("group_blocks", True), []).append(i)
    return list(out.values())


def prefill_cost(records: list[dict]) -> float:
    """A rung's measured prefill seconds over the documents (its cost when families compete)."""
    return sum(r["prefill_seconds_iceformer"] for r in records)


def choose_levels(measured: list[list[dict] | None], ladder: list[dict]) -> dict[int, tuple[int, bool]]:
    """level -> (rung index, meets). measured[i] is ladder[i]'s records (None: not run). Per family, the
    first (cheapest) rung whose records all keep the level's promise; of those, the one with the least
    prefill time. A level no rung meets gets the first family's most exact rung, not meeting it."""
    groups = families(ladder)
    chosen = {}
    for level in SPEED_LEVELS:
        hits = [next((i for i in family if i < len(measured) and meets(measured[i], level)), None)
                for family in groups]
        hits = [i for i in hits if i is not None]
        chosen[level] = ((min(hits, key=lambda i: prefill_cost(measured[i])), True) if hits
                         else (groups[0][-1], False))
    return chosen


def rung_summary(knobs: dict, records: list[dict] | None) -> dict | None:
    """A rung's figures over the documents (floor.aggregate), its prefill speed-up, and the documents'
    (None for a rung not run)."""
    if records is None:
        return None
    dense_s = sum(r["prefill_seconds_dense"] for r in records)
    ice_s = prefill_cost(records)
    return {"knobs": knobs, **aggregate(records), "prefill_speedup": dense_s / ice_s if ice_s else None,
            "documents": [{k: r[k] for k in ("document", "n_tokens", "top1_agreement", "mean_kl", "ppl_vs_dense")}
                          for r in records]}


def make_profile(*, sha256: str, info, model: str, lengths, texts, ladder, measured, command: str,
                 threads: int, layers: dict | None = None) -> dict:
    """The profile document (runtime/calibration.py reads it) from the measured rungs (and the layer stage's
    figures, Calibration.layers)."""
    rungs = [rung_summary(ladder[i], records) for i, records in enumerate(measured)]
    levels = {}
    for level, (index, ok) in choose_levels(measured, ladder).items():
        measured_rung = (rungs[index] if index < len(rungs) else None) or {}
        figures = {k: v for k, v in measured_rung.items() if k not in ("knobs", "documents")}
        levels[str(level)] = {"knobs": dict(ladder[index]), "rung": index, "meets": ok,
                              "promise": LEVEL_PROMISES[level], **figures}
    from ..runtime.calibration import PROFILE_FORMAT

    return {"format": PROFILE_FORMAT, "model_sha256": sha256, "model_name": info.name,
            "architecture": info.architecture, "model_file": model, "lengths": list(lengths),
            "documents": [{k: t[k] for k in ("document", "class", "split", "n_tokens", "first_position",
                                             "ppl_dense", "floor")} for t in texts],
            "levels": levels, "rungs": rungs, "layers": layers, "command": command, "threads": threads,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def format_levels(profile: dict) -> str:
    """The chosen knobs and figures per level, one line each."""
    def pct(x, digits=2):
        return "-" if x is None else f"{x * 100:+.{digits}f}%"

    def pts(x):
        return "-" if x is None else f"{x * 100:+.1f}"

    head = ("level", "blocks per", "top_blocks", "window", "worst ppl vs dense", "worst top-1 - floor (pts)",
            "keys attended", "prefill x", "meets", "promise")
    lines = [head]
    for level, entry in sorted(profile["levels"].items(), key=lambda kv: int(kv[0])):
        knobs = entry["knobs"]
        speed = entry.get("prefill_speedup")
        per = "group" if knobs.get("group_blocks", True) else "head"
        lines.append((level, per, str(knobs.get("top_blocks", "-")), str(knobs.get("window", "-")),
                      pct(entry.get("ppl_vs_dense_max")), pts(entry.get("top1_minus_floor_min")),
                      "-" if entry.get("keys_attended_share") is None else f"{entry['keys_attended_share']:.0%}",
                      "-" if speed is None else f"{speed:.2f}", "yes" if entry["meets"] else "NO",
                      describe_promise(int(level))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    out = ["  ".join(c.rjust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Running


def _check_lengths(args, info) -> list[int]:
    cap = info.context_length
    if args.lengths is None:
        lengths = [n for n in DEFAULT_LENGTHS if cap is None or n <= cap] or [cap]
    else:
        lengths = args.lengths
        above = [n for n in lengths if cap is not None and n > cap]
        if above:
            raise UsageError(f"--lengths {','.join(map(str, above))} above the model's trained context of {cap} "
                             "tokens: choose shorter lengths")
    return lengths


def ladder_for(per_head: str, info) -> list[dict]:
    """LADDER, or its grouped family alone: with --per-head off, or auto on a model whose every query head has
    its own KV head (no GQA: per head and per group are the same choice)."""
    shared = info.n_head is None or info.n_head_kv is None or info.n_head > info.n_head_kv
    return LADDER if per_head == "on" or (per_head == "auto" and shared) else GROUPED


def _estimate(seconds_first: float, tokens_first: int, documents, n_rungs: int, shaping_passes: int = 0,
              shaping_tokens: int = 0) -> str:
    """A rough upper bound of the run time, from the first document's reference (dense and floor)."""
    per_token = seconds_first / 2 / max(1, tokens_first)
    total = per_token * (sum(len(d.tokens) for d in documents) * (2 + n_rungs) + shaping_passes * shaping_tokens)
    layers = f", {shaping_passes} layer-sensitivity passes" if shaping_passes else ""
    return (f"calibrate: {len(documents)} documents, up to {n_rungs} settings{layers}: estimated up to about "
            f"{max(1, round(total / 60))} min (stops sooner once level 1 is met)")


def shaping_documents(documents) -> list[int]:
    """Indices of the documents the layer sensitivity is measured on: the first of each class (user files
    form one class) at the shortest length, which keeps the stage to a few passes per layer."""
    shortest = min(len(d.tokens) for d in documents)
    chosen, seen = [], set()
    for i, doc in enumerate(documents):
        klass = doc.describe().get("class")
        if len(doc.tokens) == shortest and klass not in seen:
            seen.add(klass)
            chosen.append(i)
    return chosen


@dataclasses.dataclass
class Calibration:
    """What calibrate() measured: each document's reference figures (texts), the ladder (shaped when layer
    shaping ran), each rung's per-document records (measured, aligned with the ladder; None: not run), and
    the layer stage's figures (None: off)."""
    texts: list
    ladder: list
    measured: list
    layers: dict | None = None


def calibrate(llm, floor_llm, documents, *, positions: int, ladder=LADDER, shape_knobs: dict | None = SHAPE_KNOBS,
              progress: bool = False, log=None) -> Calibration:
    """Each document's reference, then (with shape_knobs) the layers' sensitivity and the ladder reshaped by it
    (layer_shape.py), then per rung its per-document records (floor.document_record): each family of rungs
    from the cheapest until one keeps level 1's promise on every document (a later family also until one
    runs slower than the first family's last rung measured)."""
    from tqdm import tqdm

    from .accuracy import compare
    from .evaluate import document_reference
    from .floor import document_record
    from .layer_shape import layer_shape, measure_sensitivity

    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    shaping = shaping_documents(documents) if shape_knobs else []
    n_layer = llm.n_layer() if shaping else 0
    shortest = min(len(d.tokens) for d in documents)   # the shaping documents' length (shaping_documents)
    ladder = hold_share(ladder, max(len(d.tokens) for d in documents))
    refs, texts = [], []
    with tqdm(total=len(documents) * (2 + len(ladder)) + (n_layer + 1) * len(shaping), desc="calibrate", unit="run",
              file=sys.stderr, disable=not progress) as bar:
        for i, doc in enumerate(documents):
            t0 = time.perf_counter()
            first = max(0, len(doc.tokens) - 1 - positions)
            dense, dense_s, text = document_reference(llm, doc, first, bar=bar, floor_llm=floor_llm)
            refs.append((doc, first, dense, dense_s))
            texts.append(text)
            if i == 0:
                say(_estimate(time.perf_counter() - t0, len(doc.tokens), documents, len(ladder),
                              (n_layer + 1) * len(shaping), shortest))
        layers = None
        if shaping:
            kl, blocks = measure_sensitivity(llm, [refs[j][:2] for j in shaping], shape_knobs,
                                             on_layer=lambda _: bar.update(len(shaping)))
            bar.update(len(shaping))   # the exact reference pass
            shape = layer_shape(kl)
            layers = {"knobs": dict(shape_knobs), "cheap_blocks": blocks,
                      "documents": [texts[j]["document"] for j in shaping], "n_tokens": shortest,
                      "sensitivity_kl": kl, "layer_budget": list(shape)}
            ladder = [{**rung, "layer_budget": shape} for rung in ladder]
        measured = [None] * len(ladder)
        bound = None   # the first family's most exact measured rung's prefill seconds
        groups = families(ladder)
        for n, family in enumerate(groups):
            for i in family:
                settings = IceformerSettings(**ladder[i])
                records = []
                for (doc, first, dense, dense_s), text in zip(refs, texts):
                    stats, ice_s = compare(llm, doc.tokens, settings, dense, first=first)
                    records.append(document_record("", doc.describe(), first, stats, dense_s, ice_s, text["floor"]))
                    bar.update(1)
                measured[i] = records
                if n == 0:
                    bound = prefill_cost(records)
                if meets(records, min(SPEED_LEVELS)) or (n > 0 and prefill_cost(records) > bound):
                    break
            bar.total = bar.n + len(documents) * sum(len(f) for f in groups[n + 1:])   # the rungs not run leave it
            bar.refresh()
    return Calibration(texts, ladder, measured, layers)


def cmd_calibrate(args) -> int:
    from ..runtime.calibration import model_sha256, save_profile
    from ..runtime.models import check_gguf, resolve_model
    from .documents import read_text_file
    from .evaluate import _CTX_SLACK, _open, corpus_documents

    model = str(resolve_model(args.model))
    info = check_gguf(model)
    lengths = _check_lengths(args, info)
    if args.classes is None:
        args.classes = [] if args.text_file else list(CLASSES)
    for path in args.text_file or []:
        read_text_file(path)
    args.model = model
    started = time.time()
    with contextlib.ExitStack() as stack:
        llm = stack.enter_context(_open(args, max(lengths) + _CTX_SLACK))
        llm.profile = None   # measure the rungs as they are, whatever profile the model has now
        documents, _ = corpus_documents(llm, lengths, args)
        if not documents:
            raise UsageError(f"no document of {','.join(map(str, lengths))} tokens in --classes "
                             f"{','.join(args.classes) or 'none'} (--docs {args.docs}): choose shorter --lengths")
        min_n_kv = llm.attention_params()["min_n_kv"]
        shape = args.layer_shape == "on"
        if max(lengths) <= min_n_kv:
            print(f"note: rows that see fewer than {min_n_kv} keys run dense attention, so at --lengths "
                  f"{','.join(map(str, lengths))} every setting measures alike (and every layer: no layer "
                  "shaping); calibrate at the lengths you use", file=sys.stderr, flush=True)
            shape = False
        flipped = argparse.Namespace(**vars(args))
        flipped.flash_attn = "off" if args.flash_attn != "off" else "on"
        floor_llm = stack.enter_context(_open(flipped, max(lengths) + _CTX_SLACK))
        result = calibrate(llm, floor_llm, documents, positions=args.positions,
                           ladder=ladder_for(args.per_head, info), shape_knobs=SHAPE_KNOBS if shape else None,
                           progress=sys.stderr.isatty())
    threads = args.threads or os.cpu_count() or 1
    profile = make_profile(sha256=model_sha256(model), info=info, model=model, lengths=lengths, texts=result.texts,
                           ladder=result.ladder, measured=result.measured, threads=threads, layers=result.layers,
                           command="python -m iceformer_llama " + shlex.join(sys.argv[1:]))
    profile["wall_seconds"] = round(time.time() - started, 1)
    path = save_profile(profile)
    print(format_levels(profile))
    if result.layers:
        shares = result.layers["layer_budget"]
        print(f"every level's blocks are shared by layer sensitivity: {min(shares)}% to {max(shares)}% of top_blocks "
              f"per layer (the profile's \"layers\")", file=sys.stderr)
    print(f"wrote {path}: generate, chat, serve, bench, eval and Llama use it for this model file", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Adds the `calibrate` subcommand."""
    from ..runtime.options import positive
    from .bench import parse_lengths
    from .evaluate import _classes

    p = subparsers.add_parser("calibrate", help="measure a model and store the fastest settings that keep each "
                                                "speed level's accuracy promise", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "-m", default=None, help="GGUF path, alias or REPO_ID:FILENAME (default: bundled model)")
    p.add_argument("--lengths", type=parse_lengths, default=None,
                   help=f"document lengths in tokens (default {','.join(map(str, DEFAULT_LENGTHS))}, those within "
                        "the model's trained context)")
    p.add_argument("--positions", type=positive, default=DEFAULT_POSITIONS,
                   help=f"score the last N positions of each document (default {DEFAULT_POSITIONS})")
    p.add_argument("--classes", type=_classes, default=None, metavar="CLASS,...",
                   help=f"document classes: {','.join(CLASSES)} or all (default all; none with --text-file)")
    p.add_argument("--docs", choices=SPLITS + ("all",), default="tune",
                   help="which documents of each class: tune (default; eval reports on the report set), report or all")
    p.add_argument("--docs-per-class", type=positive, default=None, metavar="N",
                   help="only the first N documents of each class (default all)")
    p.add_argument("--text-file", action="append", default=None, metavar="FILE",
                   help="also calibrate on this UTF-8 file's first --lengths tokens (repeatable)")
    p.add_argument("--threads", "-t", type=positive, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--batch-size", "-b", type=positive, default=512, help="prompt tokens per ubatch (default 512)")
    p.add_argument("--flash-attn", choices=("on", "off", "auto"), default="auto",
                   help="flash attention in dense attention (default auto); the floor flips it")
    p.add_argument("--layer-shape", choices=("on", "off"), default="on", type=str.lower,
                   help="measure each layer's sensitivity first (one pass per layer on one document per class) and "
                        "give sensitive layers more of each rung's budget (default on; off: the same budget in "
                        "every layer)")
    p.add_argument("--per-head", choices=("auto", "on", "off"), default="auto", type=str.lower,
                   help="also measure blocks chosen by each query head (group_blocks off), and give each level the "
                        "faster of the two choices that keeps its promise (default auto: on for models whose query "
                        "heads share KV heads)")
    p.set_defaults(func=cmd_calibrate, attention=None,
                   **{f"ice_{f.name}": None for f in dataclasses.fields(IceformerSettings)})
