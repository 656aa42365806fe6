"""The top-p block budget (ice_attn_params.top_p): a row attends the fewest top-ranked blocks whose
estimated softmax mass, with the sinks' and window's, reaches top_p of the row's estimated total.

Checked against the fixed-count block search (block_search_reference, float64) at the two ends and on
keys whose mass sits in a known number of blocks; tolerance NMSE < 1e-6 as in test_native_attention.py
(f32 arithmetic only).
"""

import numpy as np
import pytest

from conftest_native import block_search_data, block_search_params, block_search_reference, load_native, nmse

native = load_native()
B, SINKS, WINDOW = 32, 4, 16


_data = block_search_data


def _params(**kw):
    return block_search_params(native, B, SINKS, WINDOW, **kw)


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("mk", ["causal", "two_seq"])
def test_top_p_one_attends_every_block(group, mk):
    """top_p = 1 asks for all the estimated mass: every visible block is attended, as dense would."""
    n_kv = 32 * 20 - 7
    q, k, v, mask, scale = _data(n_kv, 8, 3, mk, seed=3)
    nb = (n_kv + B - 1) // B
    out = native.attention(q, k, v, mask, scale, _params(top_blocks=nb, top_p=1.0, group_blocks=group))
    dense = native.attention(q, k, v, mask, scale, mode="dense")
    assert nmse(out, dense) < 1e-6
    # and the cap holds: with top_blocks 3 the answer is the fixed search's
    capped = native.attention(q, k, v, mask, scale, _params(top_blocks=3, top_p=1.0, group_blocks=group))
    assert nmse(capped, block_search_reference(q, k, v, mask, scale, 3, B, SINKS, WINDOW, group=group)) < 1e-6


@pytest.mark.parametrize("group", [True, False])
def test_tiny_top_p_attends_min_blocks(group):
    """A budget the window already meets leaves min_blocks: bit for bit the fixed search at that count."""
    q, k, v, mask, scale = _data(32 * 24, 8, 3, "causal", seed=4)
    fixed = native.attention(q, k, v, mask, scale, _params(top_blocks=2, group_blocks=group))
    adaptive = native.attention(q, k, v, mask, scale, _params(top_blocks=10, min_blocks=2, top_p=1e-6,
                                                              group_blocks=group))
    assert np.array_equal(fixed, adaptive)
    none = native.attention(q, k, v, mask, scale, _params(top_blocks=10, top_p=1e-6, group_blocks=group))
    assert nmse(none, block_search_reference(q, k, v, mask, scale, 0, B, SINKS, WINDOW, group=group)) < 1e-6


def _three_strong_blocks(gqa, strength):
    """Every query head near one direction u; the keys of blocks 3, 9 and 17 carry `strength` * u, the
    rest are small noise. strength 20: those blocks hold nearly all the softmax mass (about e^8 per key
    against e^0), a third each; strength 0: the mass is spread evenly over the blocks."""
    n_kv, n_tok = 32 * 30, 4
    rng = np.random.default_rng(5)
    u = rng.standard_normal(64)
    u /= np.linalg.norm(u)
    q = (3.0 * u + 0.3 * rng.standard_normal((1, gqa, n_tok, 64))).astype(np.float32)
    k = (0.3 * rng.standard_normal((1, 1, n_kv, 64))).astype(np.float32)
    for b in (3, 9, 17):
        k[0, 0, b * B:(b + 1) * B] += (strength * u).astype(np.float32)
    v = rng.standard_normal((1, 1, n_kv, 64)).astype(np.float32)
    mask = np.zeros((1, 9, n_kv), np.float32)   # every cell visible to every row
    return q, k, v, mask, 1.0 / 8.0


@pytest.mark.parametrize("gqa", [1, 3])
def test_budget_follows_the_mass(gqa):
    """Mass in three blocks: top_p 0.9 takes those three (the fixed search with 3 blocks, not 2, and not
    the cap of 12). Mass spread evenly over 28 blocks: top_p 0.9 needs more than the cap, so takes 12."""
    q, k, v, mask, scale = _three_strong_blocks(gqa, 20.0)
    out = native.attention(q, k, v, mask, scale, _params(top_blocks=12, top_p=0.9))
    assert nmse(out, block_search_reference(q, k, v, mask, scale, 3, B, SINKS, WINDOW, group=True)) < 1e-6
    assert nmse(out, block_search_reference(q, k, v, mask, scale, 2, B, SINKS, WINDOW, group=True)) > 1e-6
    assert nmse(out, block_search_reference(q, k, v, mask, scale, 12, B, SINKS, WINDOW, group=True)) > 1e-6
    q, k, v, mask, scale = _three_strong_blocks(gqa, 0.0)
    out = native.attention(q, k, v, mask, scale, _params(top_blocks=12, top_p=0.9))
    assert nmse(out, block_search_reference(q, k, v, mask, scale, 12, B, SINKS, WINDOW, group=True)) < 1e-6
    assert nmse(out, block_search_reference(q, k, v, mask, scale, 11, B, SINKS, WINDOW, group=True)) > 1e-6


@pytest.mark.parametrize("n_tok", [1, 48])
def test_threads_bit_identical(n_tok):
    q, k, v, mask, scale = _data(3000, n_tok, 3, "two_seq" if n_tok > 1 else "causal", seed=9)
    params = _params(top_blocks=40, min_blocks=4, top_p=0.95)
    one = native.attention(q, k, v, mask, scale, params, n_threads=1)
    for nth in (3, 5):
        assert np.array_equal(one, native.attention(q, k, v, mask, scale, params, n_threads=nth)), nth


@pytest.mark.parametrize("bad", [dict(top_p=-0.1), dict(top_p=1.5), dict(top_p=float("nan")), dict(min_blocks=-1)])
def test_bad_params(bad):
    with pytest.raises(native.NativeError):
        native.AttentionState(_params(**bad))


@pytest.mark.parametrize("group", [True, False])
def test_counts_measure_what_was_attended(group):
    """ice_attn_state_counts: rows x heads answered, keys attended and visible. Mass in three blocks:
    each (row, head) attends the union (4 sinks + 16 window) and three blocks of 32, whether the blocks are
    chosen per GQA group or per head (counted per group there); dense reads all 960."""
    q, k, v, mask, scale = _three_strong_blocks(3, 20.0)
    state = native.AttentionState(_params(top_blocks=12, top_p=0.9, group_blocks=group))
    native.attention(q, k, v, mask, scale, state=state, n_threads=3)
    c = state.counts()
    n = 4 * 3   # tokens x query heads
    assert c == {"n_rows": n, "n_attended": n * (SINKS + WINDOW + 3 * B), "n_visible": n * 960}
    native.attention(q, k, v, mask, scale, state=state)   # counts add up over calls
    assert state.counts()["n_rows"] == 2 * n
    fixed = native.AttentionState(_params(top_blocks=12, group_blocks=group))
    native.attention(q, k, v, mask, scale, state=fixed)
    # twelve blocks, some of which overlap the sinks or the window
    assert n * (SINKS + WINDOW + 10 * B) < fixed.counts()["n_attended"] <= n * (SINKS + WINDOW + 12 * B)


def test_settings_and_flags_check_top_p():
    """The Python settings and the CLI flag refuse what the kernel would: a share outside 0..1."""
    import argparse

    from iceformer_llama.runtime.settings import IceformerSettings, add_arguments, from_arguments

    assert IceformerSettings(top_p=0.9, min_blocks=4).kernel_overrides() == {"top_p": 0.9, "min_blocks": 4}
    for bad in (1.5, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="top_p must be a number from 0 to 1"):
            IceformerSettings(top_p=bad)
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    assert from_arguments(parser.parse_args(["--top-p", "0.95", "--min-blocks", "8"])).top_p == 0.95
    for bad in ("1.5", "abc"):
        with pytest.raises(argparse.ArgumentError):
            parser.parse_args(["--top-p", bad])
