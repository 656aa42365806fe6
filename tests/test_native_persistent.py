"""Persistent state (ice_attn_io's written cells and cache versions) against a rebuild per call.

A simulated KV cache (one buffer that stays in place, like llama.cpp's) is filled ubatch by ubatch,
decoded token by token, edited (cells freed and reused, data rewritten) and read through two states:
one persistent, told what each evaluation writes, and one rebuilt from the views on every call.
Block summaries are recomputed block by block in a fixed order either way, so the outputs must be
bit for bit equal; a state that missed a write would rank blocks on stale sums and differ.
"""

import dataclasses

import numpy as np
import pytest

from conftest_native import load_native, nmse, reference_attention, structured_keys

native = load_native()

SIZE = 704          # cells per stream
D = 64
HK, GQA = 2, 3
SPARSE = dict(top_k=0, n_sinks=2, window=8, block_size=16, min_n_kv=0, top_blocks=3, tail_estimate=False)


class SimCache:
    """K/V buffers (n_stream, HK, SIZE, D) and the position of each cell (-1: empty)."""

    def __init__(self, rng, n_stream=1, dtype=np.float16):
        self.rng, self.dtype = rng, dtype
        self.k = np.zeros((n_stream, HK, SIZE, D), dtype)
        self.v = np.zeros((n_stream, HK, SIZE, D), dtype)
        self.pos = np.full((n_stream, SIZE), -1)
        self.version = 1        # the last version an evaluation created
        self.valid_since = 1    # nothing but listed writes changed the cache since this version

    def edit(self):
        """Records a change the persistent state cannot see (what the llama.cpp glue does on a K-shift)."""
        self.version += 1
        self.valid_since = self.version

    def next_write(self, ids):
        self.version += 1
        return native.CacheWrite(tuple(int(i) for i in ids), SIZE, self.valid_since, self.version)

    def write(self, s, cells, positions):
        n = len(cells)
        for h in range(HK):
            self.k[s, h, cells] = structured_keys(self.rng, n, D).astype(self.dtype)
            self.v[s, h, cells] = self.rng.standard_normal((n, D)).astype(self.dtype)
        self.pos[s, cells] = positions

    def n_kv(self):
        used = np.nonzero((self.pos >= 0).any(axis=0))[0]
        return min(SIZE, (int(used.max()) + 1 + 31) // 32 * 32) if len(used) else 32

    def mask(self, s, row_positions, n_kv):
        p = self.pos[s, :n_kv]
        rows = np.asarray(row_positions)[:, None]
        vis = (p[None, :] >= 0) & (p[None, :] <= rows)
        return np.where(vis, 0.0, -np.inf).astype(self.dtype)


def evaluate(cache, states, s, cells, positions, params, *, v_transposed=False, fresh=True, rng=None):
    """Writes one ubatch into stream s and evaluates it with the persistent state and a rebuild.
    Returns (persistent output, rebuilt output)."""
    cache.write(s, cells, positions)
    n_kv = cache.n_kv()
    q = (rng or cache.rng).standard_normal((1, HK * GQA, len(cells), D)).astype(np.float32)
    mask = cache.mask(s, positions, n_kv)
    k = cache.k[s:s + 1, :, :n_kv]
    v = cache.v[s:s + 1, :, :n_kv]
    if v_transposed:
        v = np.ascontiguousarray(v)   # transposed layout lives in its own buffer, see below
    write = cache.next_write(s * SIZE + c for c in cells)
    p = native.AttnParams.default(**params)
    out_p = native.attention(q, k, v, mask, 0.125, p, state=states[0], write=write, n_threads=2)
    out_r = None
    if fresh:
        out_r = native.attention(q, k, v, mask, 0.125, dataclasses.replace(p, persistent=False), n_threads=2)
    return out_p, out_r, (q, k, v, mask)


def prompt_then_decode(cache, state, params, n_prompt=300, ubatch=7, n_decode=24, s=0):
    pos = 0
    while pos < n_prompt:
        n = min(ubatch, n_prompt - pos)
        out_p, out_r, _ = evaluate(cache, state, s, np.arange(pos, pos + n), np.arange(pos, pos + n), params)
        assert np.array_equal(out_p, out_r), f"ubatch at {pos}"
        pos += n
    for _ in range(n_decode):
        out_p, out_r, _ = evaluate(cache, state, s, np.array([pos]), np.array([pos]), params)
        assert np.array_equal(out_p, out_r), f"decode at {pos}"
        pos += 1
    return pos


@pytest.mark.parametrize("ubatch", [1, 7, 64])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("tail", [False, True])
def test_updates_equal_rebuild_while_the_cache_grows(ubatch, dtype, tail):
    cache = SimCache(np.random.default_rng(ubatch), dtype=dtype)
    with native.AttentionState() as st:
        prompt_then_decode(cache, [st], dict(SPARSE, tail_estimate=tail), n_prompt=200 if ubatch == 1 else 400,
                           ubatch=ubatch)


def test_cell_reuse_after_removal_equals_rebuild():
    cache = SimCache(np.random.default_rng(3))
    with native.AttentionState() as st:
        pos = prompt_then_decode(cache, [st], SPARSE, n_prompt=400, ubatch=64, n_decode=4)
        cache.pos[0, 100:180] = -1                     # seq_rm of a middle range: cells keep stale data
        holes = np.arange(100, 180)
        for i in range(0, len(holes), 16):             # new tokens fill the holes (find_slot's order)
            cells = holes[i:i + 16]
            out_p, out_r, _ = evaluate(cache, [st], 0, cells, np.arange(pos, pos + len(cells)), SPARSE)
            assert np.array_equal(out_p, out_r)
            pos += len(cells)
        for _ in range(8):
            out_p, out_r, _ = evaluate(cache, [st], 0, np.array([pos % SIZE if pos < SIZE else 0]), np.array([pos]),
                                       SPARSE)
            assert np.array_equal(out_p, out_r)
            pos += 1


def test_an_unlisted_write_is_missed_and_a_recorded_edit_rebuilds():
    """Negative control for the tests above, then the remedy the version numbers give."""
    cache = SimCache(np.random.default_rng(4))
    with native.AttentionState() as st:
        pos = prompt_then_decode(cache, [st], SPARSE, n_prompt=400, ubatch=64, n_decode=2)
        # rewrite keys of many blocks in place without telling the state (what a K-shift does)
        cache.k[0, :, :350] *= -3
        out_p, out_r, _ = evaluate(cache, [st], 0, np.array([pos]), np.array([pos]), SPARSE)
        assert not np.array_equal(out_p, out_r), "stale summaries went unnoticed: the test cannot fail"
        cache.k[0, :, :350] *= -1
        cache.edit()                                   # the caller records the edit
        out_p, out_r, _ = evaluate(cache, [st], 0, np.array([pos + 1]), np.array([pos + 1]), SPARSE)
        assert np.array_equal(out_p, out_r)


def test_streams_keep_separate_state():
    """Two sequences in two streams, evaluated in alternation, each through views starting at its stream."""
    cache = SimCache(np.random.default_rng(5), n_stream=2)
    pos = [0, 0]
    with native.AttentionState() as st:
        for step in range(30):
            s = step % 2
            n = 40 if step < 12 else 1
            cells = np.arange(pos[s], pos[s] + n)
            out_p, out_r, _ = evaluate(cache, [st], s, cells, cells, SPARSE)
            assert np.array_equal(out_p, out_r), (step, s)
            pos[s] += n


def test_a_stream_keeps_its_state_across_other_streams_evaluations():
    """Per-sequence streams (kv_unified off): ubatches of stream 0 do not cost stream 1 its state.
    Shown by an in-place change to stream 1 that only a rebuild would see, then the recorded edit."""
    cache = SimCache(np.random.default_rng(11), n_stream=2)
    with native.AttentionState() as st:
        for s in (0, 1):
            evaluate(cache, [st], s, np.arange(0, 300), np.arange(0, 300), SPARSE)
        cache.k[1, :, :250] *= -3                      # unseen by the state, on purpose
        for pos in range(300, 305):
            out_p, out_r, _ = evaluate(cache, [st], 0, np.array([pos]), np.array([pos]), SPARSE)
            assert np.array_equal(out_p, out_r)
        out_p, out_r, _ = evaluate(cache, [st], 1, np.array([300]), np.array([300]), SPARSE)
        assert not np.array_equal(out_p, out_r), "stream 1 was rebuilt: its state did not survive stream 0's ubatches"
        cache.edit()
        out_p, out_r, _ = evaluate(cache, [st], 1, np.array([301]), np.array([301]), SPARSE)
        assert np.array_equal(out_p, out_r)


def test_parameter_changes_between_evaluations_equal_rebuild():
    """Knobs changed on a live state (what llama_iceformer_set does) never leave stale summaries."""
    cache = SimCache(np.random.default_rng(12))
    variants = [SPARSE, dict(SPARSE, block_size=32), dict(SPARSE, tail_estimate=True), dict(SPARSE, top_blocks=0,
                tail_estimate=False, window=4), dict(SPARSE, top_k=16, exact_search=True), SPARSE]
    with native.AttentionState() as st:
        pos = 0
        for i, params in enumerate(variants * 2):
            n = 64 if i < 4 else 3
            cells = np.arange(pos, pos + n)
            out_p, out_r, _ = evaluate(cache, [st], 0, cells, cells, params)
            assert np.array_equal(out_p, out_r), params
            pos += n


def test_transposed_values_equal_rebuild():
    rng = np.random.default_rng(6)
    cache = SimCache(rng)
    vt = np.zeros((1, HK, D, SIZE), np.float16)     # llama.cpp's V cache without flash attention
    with native.AttentionState() as st:
        for pos in list(range(0, 320, 64)) + list(range(320, 330)):
            n = 64 if pos < 320 else 1
            cells = np.arange(pos, pos + n)
            cache.write(0, cells, cells)
            vt[0] = np.swapaxes(cache.v[0], -1, -2)
            n_kv = cache.n_kv()
            q = rng.standard_normal((1, HK * GQA, n, D)).astype(np.float32)
            mask = cache.mask(0, cells, n_kv)
            write = cache.next_write(cells)
            p = native.AttnParams.default(**SPARSE)
            args = (q, cache.k[:, :, :n_kv], vt[:, :, :, :n_kv], mask, 0.125)
            out_p = native.attention(*args, p, state=st, write=write, v_transposed=True)
            out_r = native.attention(*args, dataclasses.replace(p, persistent=False), v_transposed=True)
            assert np.array_equal(out_p, out_r), pos


def test_dci_index_updated_in_place_covers_every_cell():
    """k-NN search with k = every cell, fed by upserts (growth, then cell reuse): must be exact."""
    params = dict(top_k=SIZE, n_sinks=0, window=0, block_size=16, min_n_kv=0, top_blocks=0)
    cache = SimCache(np.random.default_rng(7))
    with native.AttentionState() as st:
        pos = 0
        steps = [np.arange(0, 128), np.arange(128, 200)] + [np.array([c]) for c in range(200, 210)]
        for cells in steps:
            out_p, _, (q, k, v, mask) = evaluate(cache, [st], 0, cells, np.arange(pos, pos + len(cells)), params,
                                                fresh=False)
            pos += len(cells)
            assert nmse(out_p, reference_attention(q, k, v, mask[None], 0.125)) < 1e-6
        cache.pos[0, 50:90] = -1
        out_p, _, (q, k, v, mask) = evaluate(cache, [st], 0, np.arange(50, 90), np.arange(pos, pos + 40), params,
                                            fresh=False)
        assert nmse(out_p, reference_attention(q, k, v, mask[None], 0.125)) < 1e-6


def test_dci_key_beyond_the_embedding_bound_rebuilds():
    """A key far longer than any seen (beyond M and its headroom) cannot be embedded: rebuild, stay exact."""
    params = dict(top_k=SIZE, n_sinks=0, window=0, block_size=16, min_n_kv=0, top_blocks=0)
    cache = SimCache(np.random.default_rng(8))
    with native.AttentionState() as st:
        evaluate(cache, [st], 0, np.arange(0, 128), np.arange(0, 128), params, fresh=False)
        cache.write(0, np.array([128]), np.array([128]))
        cache.k[0, :, 128] *= 50
        n_kv = cache.n_kv()
        q = cache.rng.standard_normal((1, HK * GQA, 1, D)).astype(np.float32)
        mask = cache.mask(0, [128], n_kv)
        k, v = cache.k[:, :, :n_kv], cache.v[:, :, :n_kv]
        write = cache.next_write((128,))
        out = native.attention(q, k, v, mask, 0.125, native.AttnParams.default(**params), state=st, write=write)
        assert nmse(out, reference_attention(q, k, v, mask[None], 0.125)) < 1e-6


def test_state_memory_at_8k_is_a_fraction_of_the_cache():
    """Issue bound: index plus summaries at most 25% of the KV cache at 8k (bundled model's heads:
    3 KV heads of 64, f16); per layer here, default settings, after a decode step."""
    rng = np.random.default_rng(9)
    n_kv, hk = 8192, 3
    k = rng.standard_normal((1, hk, n_kv, 64)).astype(np.float16)
    v = rng.standard_normal((1, hk, n_kv, 64)).astype(np.float16)
    q = rng.standard_normal((1, 9, 1, 64)).astype(np.float32)
    mask = np.zeros((1, 1, n_kv), np.float16)
    write = native.CacheWrite((n_kv - 1,), n_kv, 1, 2)
    with native.AttentionState() as st:
        native.attention(q, k, v, mask, 0.125, state=st, write=write, n_threads=2)
        kv_bytes = k.nbytes + v.nbytes
        assert st.memory() <= 0.25 * kv_bytes, (st.memory(), kv_bytes)
