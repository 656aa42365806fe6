"""The latency knob (--speed): its levels, how it combines with explicit knobs, and that it trades
accuracy in the stated direction on the bundled model."""

import numpy as np
import pytest

from iceformer_llama.runtime import native
from iceformer_llama.runtime.settings import DEFAULT_SPEED, SPEED_LEVELS, IceformerSettings
from test_dense_identity import probe


def exact_keys(level: int) -> int:
    """Keys a query attends exactly at a level, beyond the 4 sinks (its GQA group's blocks plus the window)."""
    knobs = SPEED_LEVELS[level]
    return knobs["top_blocks"] * knobs["block_size"] + knobs["window"]


def test_levels_run_from_most_exact_to_fastest():
    levels = sorted(SPEED_LEVELS)
    assert levels == list(range(1, len(levels) + 1))
    budgets = [exact_keys(lv) for lv in levels]
    assert all(a > b for a, b in zip(budgets, budgets[1:])), budgets


def test_the_library_default_is_the_default_level():
    """The defaults live in C (ice_attn_default_params); the Python table must name them as a level."""
    p = native.AttnParams.default()
    assert {k: getattr(p, k) for k in SPEED_LEVELS[DEFAULT_SPEED]} == SPEED_LEVELS[DEFAULT_SPEED]


def test_explicit_knobs_win_over_the_level():
    level3 = {"block_size": 16, "top_blocks": 240, "window": 128, "block_share": 0.625}
    assert IceformerSettings(speed=3).kernel_overrides() == level3
    assert IceformerSettings(speed=3, window=200).kernel_overrides() == {**level3, "window": 200}
    assert IceformerSettings(top_blocks=5).kernel_overrides() == {"top_blocks": 5}
    assert IceformerSettings().kernel_overrides() == {}


@pytest.mark.parametrize("bad", [0, 9, -1, True, "3"])
def test_bad_levels_are_refused(bad):
    with pytest.raises(ValueError, match="speed must be"):
        IceformerSettings(speed=bad)


def _top1(ref: np.ndarray, got: np.ndarray) -> float:
    return float((ref.argmax(axis=1) == got.argmax(axis=1)).mean())


def test_a_slower_level_is_closer_to_dense(builds, bundled_model, tmp_path):
    """1536 tokens, layers sparse past min_n_kv (1024 visible keys): speed 1 attends up to 2.7k keys
    per query (everything here), speed 8 about 200, so speed 8 must lose agreement and speed 1 must not."""
    n = 1536
    dense = probe(tmp_path, "patched", "dense", n_tokens=n)[1100:]
    exact = probe(tmp_path, "patched", "iceformer", n_tokens=n, speed=1)[1100:]
    fast = probe(tmp_path, "patched", "iceformer", n_tokens=n, speed=8)[1100:]
    assert not np.array_equal(fast, exact)
    err_exact = float(np.abs(exact - dense).max(axis=1).mean())
    err_fast = float(np.abs(fast - dense).max(axis=1).mean())
    assert err_exact < err_fast, (err_exact, err_fast)
    assert _top1(dense, exact) >= _top1(dense, fast)


# ------------------------------------------------------------------------------------------------
# Per-layer budgets (layer_budget: percent of top_blocks per layer)


@pytest.mark.parametrize("bad", [(1001,), (-1,), (True,), ("100",), (100,) * 257, 100])
def test_bad_layer_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="layer_budget must be"):
        IceformerSettings(layer_budget=bad)


def test_layer_budget_flag_parses_percentages():
    from iceformer_llama.commands.cli import build_parser
    from iceformer_llama.runtime.settings import from_arguments

    args = build_parser().parse_args(["generate", "-p", "x", "--layer-budget", "100,250,0"])
    assert from_arguments(args).layer_budget == (100, 250, 0)


def test_layer_budget_scales_top_blocks_layer_by_layer(builds, bundled_model, tmp_path):
    """Past min_n_kv (1024 keys) every layer attends top_blocks * layer_budget / 100 blocks: 20 blocks at
    200% everywhere is 40 blocks bit for bit, and one layer at 0% (no blocks: sinks and window only)
    changes the logits while 100% everywhere is the same as none given (the model's profile off) bit for bit."""
    n = 1536
    common = dict(top_k=0, block_size=16, window=64, block_share=0)   # a fixed count, scaled per layer
    forty = probe(tmp_path, "patched", "iceformer", n_tokens=n, top_blocks=40, layer_budget=(), **common)
    doubled = probe(tmp_path, "patched", "iceformer", n_tokens=n, top_blocks=20, layer_budget=(200,) * 30, **common)
    assert np.array_equal(forty.view(np.uint32), doubled.view(np.uint32))
    full = probe(tmp_path, "patched", "iceformer", n_tokens=n, top_blocks=40, layer_budget=(100,) * 30, **common)
    assert np.array_equal(forty.view(np.uint32), full.view(np.uint32))
    starved = probe(tmp_path, "patched", "iceformer", n_tokens=n, top_blocks=40, layer_budget=(100,) * 18 + (0,),
                    **common)
    assert not np.array_equal(forty[1100:], starved[1100:])
    assert np.array_equal(forty[:1023], starved[:1023])   # row i sees i + 1 keys: dense below min_n_kv

