"""ice_attn_forward / ice_attn_dense against a float64 dense reference.

Tolerance: NMSE < 1e-6. f16 K/V are converted exactly to f32, so the only error is f32
arithmetic (dot products, exp, accumulation over up to 8192 keys): ~1e-7 relative per
element, i.e. an NMSE around 1e-13..1e-11, far below the bound.
"""

import itertools

import numpy as np
import pytest

from conftest_native import block_search_reference, load_native, make_mask, nmse, reference_attention, structured_keys

native = load_native()

# (n_kv, n_tok) pairs; the big ones are few
SIZES = [(1, 1), (9, 1), (70, 7), (200, 32), (333, 7), (700, 32), (1100, 1), (1024, 512), (4096, 7), (8192, 1)]
HEAD = [(64, 1), (64, 3), (128, 8), (128, 1), (64, 8), (128, 3), (96, 3)]      # (head_dim, gqa)
MASKS = ["causal", "two_seq", "single", "random"]


def _cases():
    cases = []
    for i, ((n_kv, n_tok), (hd, gqa), mk) in enumerate(itertools.product(SIZES, HEAD, MASKS)):
        if n_kv >= 4096 and (hd, gqa) not in ((64, 3), (128, 8)):
            continue
        if n_tok > n_kv:
            continue
        if n_tok >= 512 and gqa == 8:
            continue
        kvt = "f16" if i % 2 == 0 else "f32"
        vt = (i // 2) % 3 == 0
        search = ("exact", "dci", "blocks", "joint", "heads")[(i // 3) % 5]
        cover = "union" if (i // 5) % 2 == 0 else "topk"
        cases.append(pytest.param(n_kv, n_tok, hd, gqa, mk, kvt, vt, search, cover,
                                  id=f"n_kv={n_kv},n_tok={n_tok},hd={hd},gqa={gqa},mask={mk},kv={kvt},"
                                     f"vT={int(vt)},search={search},cover={cover}"))
    return cases


CASES = _cases()
assert len(CASES) >= 200, len(CASES)


def _data(n_kv, n_tok, hd, gqa, mk, kvt, seed, n_head_kv=None, n_stream=1):
    rng = np.random.default_rng(seed)
    n_head_kv = n_head_kv or (1 if n_kv * n_tok >= 200_000 else 2)
    H = n_head_kv * gqa
    q = rng.standard_normal((n_stream, H, n_tok, hd)).astype(np.float32)
    k = np.stack([np.stack([structured_keys(rng, n_kv, hd) for _ in range(n_head_kv)]) for _ in range(n_stream)])
    v = rng.standard_normal((n_stream, n_head_kv, n_kv, hd)).astype(np.float32)
    dt = np.float16 if kvt == "f16" else np.float32
    k, v = k.astype(dt), v.astype(dt)
    n_rows = (n_tok + 7) // 8 * 8 + (1 if n_tok % 8 == 0 else 0)
    mask = np.stack([make_mask(mk, n_kv, n_tok, n_rows, rng, np.float16 if kvt == "f16" else np.float32)
                     for _ in range(n_stream)])
    return q, k, v, mask, 1.0 / np.sqrt(hd)


def _covering_params(n_kv, search, cover):
    """Every visible key is attended: top_k >= n_kv; DCI budgets large enough to exhaust."""
    kw = dict(top_k=n_kv, min_n_kv=0, exact_search=(search == "exact"), tail_estimate=False)
    if cover == "topk":
        kw.update(n_sinks=0, window=0)
    if search == "blocks":   # coarse search alone: every block chosen, the tail sees an empty rest
        kw.update(top_k=0, block_size=32, top_blocks=(n_kv + 31) // 32, tail_estimate=True)
    if search == "joint":    # shared blocks, no tail: each GQA group answered in one pass over its cells
        kw.update(top_k=0, block_size=32, top_blocks=(n_kv + 31) // 32, group_blocks=True)
    if search == "heads":    # blocks chosen per head, no tail: a group's heads take turns over chunks of cells
        kw.update(top_k=0, block_size=32, top_blocks=(n_kv + 31) // 32, group_blocks=False)
    if search == "dci":
        kw.update(visit_budget=n_kv * 8, retrieve_budget=n_kv)
    return native.AttnParams.default(**kw)


def _vlayout(v, vt):
    # transposed V cache: memory holds (.., d_v, n_kv); pass that buffer with v_transposed=True
    return np.ascontiguousarray(v.swapaxes(-1, -2)) if vt else v


@pytest.mark.parametrize("n_kv,n_tok,hd,gqa,mk,kvt,vt,search,cover", CASES)
def test_forward_covering_matches_dense_reference(n_kv, n_tok, hd, gqa, mk, kvt, vt, search, cover):
    q, k, v, mask, scale = _data(n_kv, n_tok, hd, gqa, mk, kvt, seed=n_kv * 31 + n_tok + hd + gqa)
    ref = reference_attention(q, k, v, mask, scale)
    out = native.attention(q, k, _vlayout(v, vt), mask, scale, _covering_params(n_kv, search, cover),
                           v_transposed=vt)
    assert np.all(np.isfinite(out))
    assert nmse(out, ref) < 1e-6


@pytest.mark.parametrize("n_kv,n_tok,hd,gqa,mk,kvt,vt,search,cover", CASES)
def test_dense_matches_reference(n_kv, n_tok, hd, gqa, mk, kvt, vt, search, cover):
    q, k, v, mask, scale = _data(n_kv, n_tok, hd, gqa, mk, kvt, seed=n_kv * 7 + n_tok + hd * gqa)
    ref = reference_attention(q, k, v, mask, scale)
    out = native.attention(q, k, _vlayout(v, vt), mask, scale, mode="dense", v_transposed=vt)
    assert np.all(np.isfinite(out))
    assert nmse(out, ref) < 1e-6


@pytest.mark.parametrize("n_stream,mask_streams", [(2, 2), (3, 1)], ids=["streams=2,mask=2", "streams=3,mask=1"])
@pytest.mark.parametrize("mode", ["iceformer", "dense"])
def test_streams(n_stream, mask_streams, mode):
    q, k, v, mask, scale = _data(600, 16, 64, 3, "causal", "f16", seed=5, n_head_kv=2, n_stream=n_stream)
    mask = mask[:mask_streams]
    ref = reference_attention(q, k, v, mask, scale)
    out = native.attention(q, k, v, mask, scale, _covering_params(600, "dci", "union"), mode=mode)
    assert nmse(out, ref) < 1e-6


def test_noncontiguous_q():
    q, k, v, mask, scale = _data(300, 9, 64, 3, "causal", "f32", seed=11)
    qbig = np.zeros(q.shape[:-1] + (2 * q.shape[-1],), np.float32)
    qbig[..., ::2] = q
    qv = qbig[..., ::2]
    assert not qv.flags.c_contiguous
    ref = reference_attention(q, k, v, mask, scale)
    for mode in ("iceformer", "dense"):
        out = native.attention(qv, k, v, mask, scale, _covering_params(300, "exact", "union"), mode=mode)
        assert nmse(out, ref) < 1e-6


@pytest.mark.parametrize("search", ["exact", "joint", "heads"])
def test_finite_mask_values_enter_the_scores(search):
    """A mask that holds biases where it is visible (ALiBi-style, not only 0 and -inf) adds them to the
    scores: the kernel skips the mask term only for rows whose mask is flat."""
    q, k, v, mask, scale = _data(700, 12, 64, 3, "causal", "f16", seed=13)
    cells = np.arange(mask.shape[-1], dtype=np.float32)
    biased = np.where(np.isfinite(mask), (-0.02 * (cells.max() - cells)).astype(mask.dtype), mask)
    params = _covering_params(700, search, "union")
    out = native.attention(q, k, v, biased, scale, params)
    assert nmse(out, reference_attention(q, k, v, biased, scale)) < 1e-6
    assert nmse(out, reference_attention(q, k, v, mask, scale)) > 1e-4


def test_zero_visible_rows_are_zero():
    q, k, v, mask, scale = _data(900, 8, 64, 1, "causal", "f32", seed=3)
    mask[:, 2, :] = -np.inf
    for mode in ("iceformer", "dense"):
        out = native.attention(q, k, v, mask, scale, native.AttnParams.default(min_n_kv=0), mode=mode)
        assert np.all(out[:, 2] == 0)
        assert np.all(np.isfinite(out))


# the coarse block search alone (no k-NN): blocks of 32 cells, 6 of them per GQA group (or per head)
_BLOCKS = {"blocks": dict(top_k=0, top_blocks=6, block_size=32),
           "head-blocks": dict(top_k=0, top_blocks=6, block_size=32, group_blocks=False)}


@pytest.mark.parametrize("search", ["exact", "dci", "blocks"])
@pytest.mark.parametrize("tail", [False, True])
def test_causality(search, tail):
    """Changing keys/values of cells after position p does not change rows <= p."""
    n_kv, n_tok = 2000, 64
    q, k, v, mask, scale = _data(n_kv, n_tok, 64, 3, "causal", "f16", seed=8)
    params = native.AttnParams.default(**{**dict(top_k=32, min_n_kv=100, exact_search=(search == "exact"),
                                                 tail_estimate=tail), **_BLOCKS.get(search, {})})
    out1 = native.attention(q, k, v, mask, scale, params)
    t = 40
    p = n_kv - n_tok + t
    rng = np.random.default_rng(1)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, p + 1:] = rng.standard_normal(k2[:, :, p + 1:].shape).astype(k.dtype) * 4
    v2[:, :, p + 1:] = rng.standard_normal(v2[:, :, p + 1:].shape).astype(v.dtype) * 4
    out2 = native.attention(q, k2, v2, mask, scale, params)
    assert np.array_equal(out1[:, : t + 1], out2[:, : t + 1])
    assert not np.array_equal(out1[:, t + 1:], out2[:, t + 1:])


@pytest.mark.parametrize("search", ["exact", "dci", "blocks", "head-blocks"])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("n_tok", [1, 48])
@pytest.mark.parametrize("gqa", [3, 8])
def test_threads_bit_identical(search, tail, n_tok, gqa):
    """Threads take (token, GQA group) units round-robin, or, with one token, halves of groups, so a
    group's two halves may go to two threads (5 threads over 4 half-groups split a group at an odd
    boundary; 40 threads leave most idle): the output must not change."""
    q, k, v, mask, scale = _data(3000, n_tok, 64, gqa, "two_seq" if n_tok > 1 else "causal", "f16", seed=9)
    params = native.AttnParams.default(**{**dict(top_k=32, min_n_kv=200, exact_search=(search == "exact"),
                                                 tail_estimate=tail), **_BLOCKS.get(search, {})})
    out1 = native.attention(q, k, v, mask, scale, params, n_threads=1)
    for nth in (3, 5, 40):
        assert np.array_equal(out1, native.attention(q, k, v, mask, scale, params, n_threads=nth)), nth
    d1 = native.attention(q, k, v, mask, scale, mode="dense", n_threads=1)
    d3 = native.attention(q, k, v, mask, scale, mode="dense", n_threads=3)
    assert np.array_equal(d1, d3)


@pytest.mark.parametrize("n_threads", [2, 4])
def test_split_rows_on_real_threads(n_threads):
    """Decode rows of the bundled model's shape (9 query heads over 3 KV heads) on concurrent threads:
    GQA groups split between two threads are joined by whichever finishes second; every repeat must give
    the single-thread output bit for bit."""
    q, k, v, mask, scale = _data(2000, 1, 64, 3, "causal", "f16", seed=12, n_head_kv=3)
    params = native.AttnParams.default(top_k=0, top_blocks=16, block_size=16, window=32, min_n_kv=0)
    ref = native.attention(q, k, v, mask, scale, params, n_threads=1)
    assert np.abs(ref).sum() > 0
    with native.AttentionState(params) as st:
        for _ in range(30):
            out = native.attention(q, k, v, mask, scale, state=st, n_threads=n_threads, concurrent=True)
            assert np.array_equal(out, ref)


def test_state_reuse_across_calls():
    """A state prepared for one io then another (different n_kv) gives the same as fresh states."""
    params = native.AttnParams.default(top_k=16, min_n_kv=64)
    with native.AttentionState(params) as st:
        for n_kv, seed in ((500, 1), (1500, 2), (300, 3)):
            q, k, v, mask, scale = _data(n_kv, 16, 64, 3, "causal", "f16", seed=seed)
            a = native.attention(q, k, v, mask, scale, state=st)
            b = native.attention(q, k, v, mask, scale, params)
            assert np.array_equal(a, b)
        assert st.memory() > 0


def test_forward_without_prepare_is_an_error():
    q, k, v, mask, scale = _data(300, 4, 64, 1, "causal", "f32", seed=4)
    ffi, lib = native.ffi, native.lib
    with native.AttentionState() as st:
        out = np.zeros((1, 4, q.shape[1], 64), np.float32)
        io = ffi.new("struct ice_attn_io *")
        for name, arr in (("q", q), ("k", k), ("v", v), ("mask", mask[:, None]), ("out", out)):
            view, _ = native._view(arr, 4, name, (arr.dtype,))
            setattr(io, name, view[0])
        io.scale = scale
        assert lib.ice_attn_forward(st._handle(), io, 0, 1) == lib.ICE_STATUS_INVALID_ARG
        assert lib.ice_attn_prepare(st._handle(), io, 0, 1) == lib.ICE_STATUS_OK
        assert lib.ice_attn_forward(st._handle(), io, 0, 1) == lib.ICE_STATUS_OK


def test_bad_io_raises():
    q, k, v, mask, scale = _data(100, 4, 64, 3, "causal", "f32", seed=4)
    with pytest.raises(native.NativeError):
        native.attention(q, k[..., :32], v, mask, scale)            # d_k disagrees
    with pytest.raises(native.NativeError):
        native.attention(q, k, v, mask[..., :50], scale)            # mask narrower than n_kv
    with pytest.raises(native.NativeError):
        native.attention(q[:, :5], k, v, mask, scale)               # 5 heads over 2 KV heads
    with pytest.raises(TypeError):
        native.attention(q.astype(np.float16), k, v, mask, scale)
    with pytest.raises(native.NativeError):
        native.AttnParams.default(top_k=-1) and native.AttentionState(native.AttnParams.default(top_k=-1))
    with pytest.raises(TypeError):
        native.AttnParams.default(topk=3)


@pytest.mark.parametrize("B", [32, 24])   # a power of two (cells to blocks by shifts) or not (divisions)
@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("keys", ["structured", "tied"])
@pytest.mark.parametrize("mk", ["causal", "two_seq"])
@pytest.mark.parametrize("n_tok,gqa", [(8, 3), (1, 8)])
def test_block_search_matches_reference(keys, mk, n_tok, gqa, group, B):
    """Which blocks the coarse search attends: the n_sel best by score (per head, or per GQA group with
    group_blocks), ties to the lower block. "tied" makes most blocks exact copies of one block (equal
    scores in float32 and float64 alike) beside three strong ones, so the tie rule decides the rest of
    the selection."""
    n_kv, n_sel = 32 * 24 - 5, 6
    q, k, v, mask, scale = _data(n_kv, n_tok, 64, gqa, mk, "f32", seed=21, n_head_kv=2)
    if keys == "tied":
        base = k[:, :, B:2 * B].copy()
        for b in range(1, n_kv // B):
            k[:, :, b * B:(b + 1) * B] = base
        for b, f in ((4, 3.0), (11, 2.5), (17, 2.0)):
            k[:, :, b * B:(b + 1) * B] *= f
    # block_share 0: the reference's fixed count (test_native_block_share.py checks the share)
    params = native.AttnParams.default(top_k=0, top_blocks=n_sel, block_size=B, n_sinks=4, window=16, min_n_kv=0,
                                       tail_estimate=False, group_blocks=group, block_share=0.0)
    ref = block_search_reference(q, k, v, mask, scale, n_sel, B, 4, 16, group=group)
    out = native.attention(q, k, v, mask, scale, params)
    assert nmse(out, ref) < 1e-6
    # and the choice matters here: the other ranking gives another answer when heads share a KV head
    if gqa > 1:
        assert nmse(out, block_search_reference(q, k, v, mask, scale, n_sel, B, 4, 16, group=not group)) > 1e-6
    # and the search matters here: attending fewer blocks gives a different answer
    fewer = native.attention(q, k, v, mask, scale, native.AttnParams.default(
        top_k=0, top_blocks=n_sel - 2, block_size=B, n_sinks=4, window=16, min_n_kv=0, tail_estimate=False,
        group_blocks=group, block_share=0.0))
    assert nmse(fewer, ref) > 1e-6


@pytest.mark.parametrize("B", [16, 32])
@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("mk", ["causal", "two_seq"])
def test_tiled_keys_match_reference(mk, group, B):
    """Many rows with f16 keys: prepare copies the keys into tiles and forward reads whole chosen blocks
    from them (the rest, the window and blocks the mask cuts, row by row). Same answer as the reference;
    the copy shows in the state's memory (the scratch, for every KV head's n_kv keys) where the tiles give
    the row path's bits (AVX-512; elsewhere none is made, so a ubatch's size never changes the result), and
    a few rows (below the threshold, as in decoding) make none."""
    n_kv, n_sel, n_head_kv, hd = 32 * 24 - 5, 6, 2, 64
    params = native.AttnParams.default(top_k=0, top_blocks=n_sel, block_size=B, n_sinks=4, window=16, min_n_kv=0,
                                       tail_estimate=False, group_blocks=group, block_share=0.0)
    memory = {}
    for n_tok in (8, 48):
        q, k, v, mask, scale = _data(n_kv, n_tok, hd, 3, mk, "f16", seed=23, n_head_kv=n_head_kv)
        ref = block_search_reference(q, k, v, mask, scale, n_sel, B, 4, 16, group=group)
        with native.AttentionState(params) as st:
            out = native.attention(q, k, v, mask, scale, params, state=st, n_threads=2)
            memory[n_tok] = st.memory()
        assert nmse(out, ref) < 1e-6
    tiles = n_head_kv * ((n_kv + 15) // 16) * 16 * hd * 2   # bytes of fp16 keys, whole tiles
    if native.simd_variant().startswith("avx512"):
        assert memory[48] - memory[8] >= tiles
    else:
        assert memory[48] - memory[8] < tiles


def test_layers_sharing_one_scratch():
    """States that borrow one scratch (the patch's layers) answer exactly as states with their own, whatever
    ran on the scratch before (other shapes, other searches, other thread counts), count only their own
    rows, and hold less together than they did apart."""
    layers = [
        (native.AttnParams.default(top_k=0, top_blocks=12, window=32, min_n_kv=0), (1500, 7, 64, 3, "causal", "f16")),
        (native.AttnParams.default(top_k=24, min_n_kv=0), (900, 32, 128, 2, "two_seq", "f32")),
        (native.AttnParams.default(top_k=0, top_blocks=8, tail_estimate=True, min_n_kv=0), (2100, 1, 64, 8, "causal", "f16")),
        (native.AttnParams.default(top_k=0, top_blocks=6, group_blocks=True, block_share=0.5, min_n_kv=0),
         (700, 9, 96, 3, "random", "f16")),
    ]
    data = [_data(*shape, seed=40 + i) for i, (_, shape) in enumerate(layers)]
    with native.AttentionScratch() as scratch:
        shared = [native.AttentionState(p, scratch=scratch) for p, _ in layers]
        own = [native.AttentionState(p) for p, _ in layers]
        for rnd in range(3):
            n_threads = (1, 2, 3)[rnd]
            for st_shared, st_own, (q, k, v, mask, scale) in zip(shared, own, data):
                a = native.attention(q, k, v, mask, scale, state=st_shared, n_threads=n_threads, concurrent=True)
                b = native.attention(q, k, v, mask, scale, state=st_own, n_threads=n_threads, concurrent=True)
                assert np.abs(a).sum() > 0
                assert np.array_equal(a, b)
        for st_shared, st_own in zip(shared, own):
            assert st_shared.counts() == st_own.counts() and st_own.counts()["n_rows"] > 0
        apart = sum(st.memory() for st in own)
        together = sum(st.memory() for st in shared) + scratch.memory()
        assert scratch.memory() > 0 and together < apart
        with pytest.raises(ValueError, match="still used by 4"):
            scratch.close()
        for st in shared + own:
            st.close()
    with pytest.raises(ValueError, match="closed"):
        scratch.memory()
