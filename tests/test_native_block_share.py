"""The block budget that grows with the context (ice_attn_params.block_share): a row attends at least
ceil(block_share x the blocks it can choose) blocks, top_blocks at least.

Checked against the fixed-count block search spelled out in float64 (block_search_reference, which
applies the same share per row); tolerance NMSE < 1e-6 as in test_native_attention.py (f32 arithmetic
only). The end-to-end count through llama.cpp is in test_attention_counts.py.
"""

import math

import numpy as np
import pytest

from conftest_native import block_search_data, block_search_params, block_search_reference, load_native, nmse

native = load_native()
B, SINKS, WINDOW = 32, 4, 16


_data = block_search_data


def _params(**kw):
    return block_search_params(native, B, SINKS, WINDOW, **kw)


def test_default_is_level_3s_share():
    assert native.AttnParams.default().block_share == 0.625


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("mk", ["causal", "two_seq"])
def test_share_one_attends_every_block(group, mk):
    """block_share 1 with a budget of one block: every visible block is attended, as dense would."""
    q, k, v, mask, scale = _data(32 * 20 - 7, 8, 3, mk, seed=3)
    out = native.attention(q, k, v, mask, scale, _params(top_blocks=1, block_share=1.0, group_blocks=group))
    assert nmse(out, native.attention(q, k, v, mask, scale, mode="dense")) < 1e-6


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("mk", ["causal", "two_seq"])
@pytest.mark.parametrize("share", [0.25, 0.5])
def test_share_sets_each_rows_budget(group, mk, share):
    """Rows that see different numbers of blocks (a causal or two-sequence mask over 600 cells) each attend
    ceil(share x their choosable blocks), never fewer than top_blocks: the reference with the same rule
    matches, and the fixed count alone does not."""
    q, k, v, mask, scale = _data(32 * 19 - 8, 24, 3, mk, seed=11)
    out = native.attention(q, k, v, mask, scale, _params(top_blocks=2, block_share=share, group_blocks=group))
    ref = block_search_reference(q, k, v, mask, scale, 2, B, SINKS, WINDOW, group=group, share=share)
    assert nmse(out, ref) < 1e-6
    assert nmse(out, block_search_reference(q, k, v, mask, scale, 2, B, SINKS, WINDOW, group=group)) > 1e-6


def test_top_blocks_stays_the_least():
    """Every cell visible: 19 choosable blocks, share 0.25 asks for 5; a top_blocks of 8 wins."""
    q, k, v, mask, scale = _data(32 * 19, 4, 3, "causal", seed=5)
    mask = np.zeros_like(mask)
    assert math.ceil(0.25 * 19) == 5
    out = native.attention(q, k, v, mask, scale, _params(top_blocks=8, block_share=0.25))
    assert np.array_equal(out, native.attention(q, k, v, mask, scale, _params(top_blocks=8)))
    five = native.attention(q, k, v, mask, scale, _params(top_blocks=1, block_share=0.25))
    assert nmse(five, block_search_reference(q, k, v, mask, scale, 5, B, SINKS, WINDOW, group=True)) < 1e-6


def test_counts_grow_with_the_share():
    """Every cell visible to 4 rows x 3 heads: the keys attended are the union plus ceil(share x 30) blocks."""
    q, k, v, mask, scale = _data(32 * 30, 4, 3, "causal", seed=6, n_head_kv=1)
    mask = np.zeros_like(mask)
    attended = {}
    for share in (0.0, 0.5):
        state = native.AttentionState(_params(top_blocks=3, block_share=share))
        native.attention(q, k, v, mask, scale, state=state)
        attended[share] = state.counts()["n_attended"]
    n = 4 * 3
    # blocks 0 and 29 hold the sinks and the window: chosen, they add 28 and 16 cells, not 32
    assert n * (SINKS + WINDOW + 1 * B) <= attended[0.0] <= n * (SINKS + WINDOW + 3 * B)
    assert n * (SINKS + WINDOW + 13 * B) <= attended[0.5] <= n * (SINKS + WINDOW + 15 * B)


@pytest.mark.parametrize("n_tok", [1, 48])
def test_threads_bit_identical(n_tok):
    q, k, v, mask, scale = _data(3000, n_tok, 3, "two_seq" if n_tok > 1 else "causal", seed=9)
    params = _params(top_blocks=4, block_share=0.3)
    one = native.attention(q, k, v, mask, scale, params, n_threads=1)
    for nth in (3, 5):
        assert np.array_equal(one, native.attention(q, k, v, mask, scale, params, n_threads=nth)), nth


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_share(bad):
    with pytest.raises(native.NativeError):
        native.AttentionState(_params(block_share=bad))


def test_settings_and_flags_check_block_share():
    """The Python settings and the CLI flag refuse what the kernel would: a share outside 0..1."""
    import argparse

    from iceformer_llama.runtime.settings import IceformerSettings, add_arguments, from_arguments

    assert IceformerSettings(block_share=0.5).kernel_overrides() == {"block_share": 0.5}
    for bad in (1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="block_share must be a number from 0 to 1"):
            IceformerSettings(block_share=bad)
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    assert from_arguments(parser.parse_args(["--block-share", "0.5"])).block_share == 0.5
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--block-share", "2"])
