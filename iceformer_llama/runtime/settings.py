"""IceFormer attention settings: one definition for the API, the CLI and the server.

Every field defaults to None, meaning "the library's default" (llama_iceformer_default_params()
in the patched llama.h, which takes the kernel's ice_attn_default_params()); so the defaults
live in C, once.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

ATTENTION_MODES = ("dense", "iceformer")
MAX_LAYERS = 256          # LLAMA_ICEFORMER_MAX_LAYERS (patch 0001)
MAX_LAYER_BUDGET = 1000   # LLAMA_ICEFORMER_MAX_LAYER_BUDGET

# The latency knob: one number from most exact (1) to fastest (8), chosen at any time without reloading
# the model (Latency Adjustable Transformer style). Each level promises an accuracy (LEVEL_PROMISES) and
# sets the kernel's budgets: the blocks of block_size (16) keys attended exactly per GQA group
# (top_blocks, chosen together by the group's query heads) and the recent window; sinks (4), dense
# layers (none), per-layer budgets (100% everywhere) and the tail estimate (off) stay at the library
# defaults. A model calibrated with `calibrate` takes each level's knobs from its profile (calibration.py):
# the cheapest settings measured to keep the level's promise on that model. Without a profile the levels
# below apply, chosen from measurements on the bundled model (README, "Latency knob"). A knob set
# explicitly beside --speed wins over the level's value. The library default is level DEFAULT_SPEED.
# Level 3 is the setting measured to keep its promise on natural text (eval's tune documents, prose and
# code) at 4k and 8k tokens on both models here (bundled SmolLM2-135M, Qwen2.5-Coder-0.5B): 160 blocks kept
# it at 4k but missed by 0.2 points on one document at 8k (docs/results.md, "Natural text"). The others are
# spaced around it by keys attended; only level 3's promise is measured without calibration.
# Past 8k a fixed count covers a shrinking share of the keys, and on natural text the error follows the
# share, so every level also attends at least block_share of the blocks a row can choose. Level 3's 0.625
# was chosen on a tune document at 16k on Qwen2.5-Coder-0.5B (man:tmux: 0.5 missed the promise by 0.3
# points, 0.625 kept it with 0.8 to spare; docs/accuracy-natural.md); it also makes rows past about 6k
# keys attend more than 240 blocks. The other levels' shares are spaced in proportion to their blocks
# (top_blocks / 384, to the nearest 1/16: exact in a C float) and are not measured.
def _level(top_blocks: int, window: int, block_share: float) -> dict:
    return {"block_size": 16, "top_blocks": top_blocks, "window": window, "block_share": block_share}


SPEED_LEVELS: dict[int, dict] = {
    1: _level(320, 128, 0.8125),
    2: _level(280, 128, 0.75),
    3: _level(240, 128, 0.625),
    4: _level(160, 128, 0.4375),
    5: _level(96, 128, 0.25),
    6: _level(64, 64, 0.1875),
    7: _level(40, 64, 0.125),
    8: _level(20, 32, 0.0625),
}
DEFAULT_SPEED = 3

# What each level promises, relative to dense attention and to llama.cpp's own floor (dense with flash
# attention flipped, on the same positions; evaluation/floor.py), teacher-forced on every document
# `calibrate` measures: perplexity at most ppl_tolerance above dense, and top-1 agreement with dense at
# most top1_margin below the floor's. Level 3 (the default) is issue #21's target; the steps roughly
# double the tolerance every two levels, and top-1 margins grow more slowly because a point of top-1 is
# felt more in greedy output than a fraction of a percent of perplexity.
LEVEL_PROMISES: dict[int, dict[str, float]] = {
    1: {"ppl_tolerance": 0.0025, "top1_margin": 0.005},
    2: {"ppl_tolerance": 0.005, "top1_margin": 0.010},
    3: {"ppl_tolerance": 0.01, "top1_margin": 0.015},
    4: {"ppl_tolerance": 0.02, "top1_margin": 0.03},
    5: {"ppl_tolerance": 0.03, "top1_margin": 0.045},
    6: {"ppl_tolerance": 0.05, "top1_margin": 0.06},
    7: {"ppl_tolerance": 0.08, "top1_margin": 0.08},
    8: {"ppl_tolerance": 0.12, "top1_margin": 0.10},
}


def describe_promise(level: int) -> str:
    """'perplexity within +1% of dense, top-1 at most 1.5 points below the floor'."""
    p = LEVEL_PROMISES[level]
    return (f"perplexity within +{p['ppl_tolerance'] * 100:g}% of dense, top-1 at most "
            f"{p['top1_margin'] * 100:g} points below the floor")


def default_attention(backend: str) -> str:
    """The attention a backend runs unless told otherwise: iceformer on patched, dense on stock."""
    return "iceformer" if backend == "patched" else "dense"


def _knob(flag: str, help: str, kind=int):
    return field(default=None, metadata={"flag": flag, "help": help, "kind": kind})


@dataclass(frozen=True, kw_only=True)
class IceformerSettings:
    """Knobs of the IceFormer kernel; None keeps the library default."""

    speed: int | None = _knob("--speed", "latency knob, 1 (most exact) to 8 (fastest); sets block_size, "
                              "top_blocks and window (see SPEED_LEVELS); explicit knobs win", kind="speed")
    top_k: int | None = _knob("--top-k", "keys retrieved per query and head by k-NN search")
    n_sinks: int | None = _knob("--sinks", "first visible keys always attended (attention sinks)")
    window: int | None = _knob("--window", "most recent visible keys always attended")
    block_size: int | None = _knob("--block-size", "keys per block of the coarse block search and the tail estimate")
    min_n_kv: int | None = _knob("--min-n-kv", "rows with fewer visible keys run dense attention")
    n_composite: int | None = _knob("--dci-l", "DCI composite indices (L)")
    n_simple: int | None = _knob("--dci-m", "DCI simple indices per composite index (m)")
    visit_budget: int | None = _knob("--visit-budget", "DCI keys visited per composite index, 0 = automatic")
    retrieve_budget: int | None = _knob("--retrieve-budget", "DCI candidates scored exactly, 0 = automatic")
    top_blocks: int | None = _knob("--top-blocks", "blocks with the largest q.mean-key attended exactly, 0 = off "
                                   "(with --top-p: the most a row attends)")
    min_blocks: int | None = _knob("--min-blocks", "with --top-p: the fewest blocks a row attends")
    top_p: float | None = _knob("--top-p", "0 = off; in (0, 1]: each row attends the fewest top-ranked blocks whose "
                                "estimated softmax mass, with the sinks' and window's, reaches this share of the "
                                "row's estimated total for every query head (top_blocks at most)", kind=float)
    block_share: float | None = _knob("--block-share", "0 = off; in (0, 1]: each row attends at least this share "
                                      "of the blocks it can choose, so the budget grows with the context "
                                      "(top_blocks at least)", kind=float)
    seed: int | None = _knob("--dci-seed", "seed of the DCI random projections")
    dense_layers: tuple[int, ...] | None = _knob("--dense-layers", "comma-separated layers kept dense", kind="layers")
    layer_budget: tuple[int, ...] | None = _knob(
        "--layer-budget", "comma-separated percent of top_blocks per layer from layer 0, later layers 100 "
        "(none: 100 everywhere)", kind="budgets")
    exact_search: bool | None = _knob("--exact-search", "brute-force top-k instead of DCI (reference)", kind=bool)
    tail_estimate: bool | None = _knob("--tail-estimate", "estimate unretrieved keys from block summaries",
                                       kind=bool)
    persistent: bool | None = _knob("--persistent", "keep block summaries and the index across decode calls "
                                    "(off: rebuild them every call, the reference)", kind=bool)
    group_blocks: bool | None = _knob("--group-blocks", "query heads sharing a KV head attend the same blocks, chosen "
                                      "together (off: each head its own top_blocks)", kind=bool)
    dense_prefill: bool | None = _knob("--dense-prefill", "prompt processing (ubatches of more than one token) "
                                       "runs exact dense attention; only decoding is sparse", kind=bool)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            kind = f.metadata["kind"]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{f.name} must be a non-negative integer, got {value!r}")
            if kind == "speed" and (not isinstance(value, int) or isinstance(value, bool) or value not in SPEED_LEVELS):
                raise ValueError(f"speed must be an integer from {min(SPEED_LEVELS)} to {max(SPEED_LEVELS)}, "
                                 f"got {value!r}")
            if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not 0.0 <= value <= 1.0):
                raise ValueError(f"{f.name} must be a number from 0 to 1, got {value!r}")
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
            if kind == "layers":
                if not all(isinstance(i, int) and 0 <= i < 256 for i in value):
                    raise ValueError(f"dense_layers must be layer numbers 0..255, got {value!r}")
                object.__setattr__(self, "dense_layers", tuple(sorted(set(value))))
            if kind == "budgets":
                if not (isinstance(value, (tuple, list)) and len(value) <= MAX_LAYERS and all(
                        isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= MAX_LAYER_BUDGET for p in value)):
                    raise ValueError(f"layer_budget must be at most {MAX_LAYERS} percentages 0..{MAX_LAYER_BUDGET}, "
                                     f"got {value!r}")
                object.__setattr__(self, "layer_budget", tuple(value))

    def overrides(self) -> dict:
        """The fields that were set (not None)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def kernel_overrides(self, levels: dict[int, dict] | None = None) -> dict:
        """The kernel knobs these settings change: the speed level's (from `levels`, default SPEED_LEVELS;
        a calibrated profile's, see calibration.py), then the explicitly set ones."""
        over = self.overrides()
        knobs = dict((SPEED_LEVELS if levels is None else levels)[over.pop("speed")]) if "speed" in over else {}
        knobs.update(over)
        return knobs


def _parse_layers(text: str) -> tuple[int, ...]:
    if text.strip() in ("", "none"):
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def _parse_budgets(text: str) -> tuple[int, ...]:
    if text.strip() in ("", "none"):
        return ()
    try:
        value = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages, got {text!r}") from None
    if len(value) > MAX_LAYERS or not all(0 <= p <= MAX_LAYER_BUDGET for p in value):
        raise argparse.ArgumentTypeError(f"expected at most {MAX_LAYERS} percentages 0..{MAX_LAYER_BUDGET}")
    return value


def _parse_share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def _parse_bool(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, with a one-line message otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


_non_negative = int_at_least(0)


def _speed_level(text: str) -> int:
    value = int_at_least(min(SPEED_LEVELS))(text)
    if value > max(SPEED_LEVELS):
        raise argparse.ArgumentTypeError(f"must be {min(SPEED_LEVELS)} to {max(SPEED_LEVELS)}, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --attention and one flag per IceformerSettings field."""
    group = parser.add_argument_group("attention")
    group.add_argument("--attention", choices=ATTENTION_MODES, default=None,
                       help="attention (default: the backend's: iceformer on patched, dense on stock; "
                            "iceformer needs the patched backend)")
    for f in dataclasses.fields(IceformerSettings):
        kind = f.metadata["kind"]
        parse = {int: _non_negative, bool: _parse_bool, "layers": _parse_layers, "speed": _speed_level,
                 "budgets": _parse_budgets, float: _parse_share}[kind]
        metavar = {bool: "on|off", "layers": "L,L", "budgets": "P,P", float: "P"}.get(kind, "N")
        group.add_argument(f.metadata["flag"], dest=f"ice_{f.name}", type=parse, default=None, metavar=metavar,
                           help=f.metadata["help"] + " (default: library default)")


def from_arguments(args: argparse.Namespace) -> IceformerSettings:
    return IceformerSettings(**{f.name: getattr(args, f"ice_{f.name}") for f in dataclasses.fields(IceformerSettings)})
