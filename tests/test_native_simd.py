"""Every SIMD variant the CPU offers (ICEFORMER_SIMD caps the choice per process) against the float64
references: dense, the coarse block search with partial blocks (blocks of 32 and of 16; per GQA group and per head), the tail
estimate at full cover, and the vector exp of the softmax over rows long enough to use every lane and
tail path. The two AVX-512 forms (512- and 256-bit row kernels) must agree bit for bit.

Tolerance: NMSE < 1e-6, as in test_native_attention.py (f32 arithmetic and a polynomial exp with
relative error about 1e-7 give NMSE around 1e-12).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest_native import block_search_reference, load_native, make_mask, nmse, reference_attention, structured_keys

native = load_native()
ORDER = ["scalar", "avx2", "avx512"]
AVX512_FORMS = ["avx512", "avx512-ymm"]   # same sums in the same order, so the same bits
B, N_SEL, SINKS, WINDOW = 32, 5, 4, 16

CONFIGS = {
    "dense": dict(mode="dense"),
    # block_share 0: the reference's fixed count of blocks
    "blocks": dict(top_k=0, top_blocks=N_SEL, block_size=B, n_sinks=SINKS, window=WINDOW, min_n_kv=0,
                   tail_estimate=False, block_share=0.0),
    "tail-cover": dict(top_k=0, top_blocks=10_000, block_size=B, min_n_kv=0, tail_estimate=True),
    # 40 blocks of 16 (the default size): full vector iterations of the ranking keys plus a scalar rest
    "blocks-16": dict(top_k=0, top_blocks=2 * N_SEL, block_size=B // 2, n_sinks=SINKS, window=WINDOW, min_n_kv=0,
                      tail_estimate=False, block_share=0.0),
    # blocks chosen per head (group_blocks off): one head's rows at a time, the single-query kernels
    "blocks-head": dict(top_k=0, top_blocks=N_SEL, block_size=B, n_sinks=SINKS, window=WINDOW, min_n_kv=0,
                        tail_estimate=False, group_blocks=False, block_share=0.0),
}

CHILD = """
import sys, numpy as np
from iceformer_llama.runtime import native
d = np.load(sys.argv[1])
cfgs = eval(sys.argv[3])
out = {"variant": np.array(native.simd_variant())}
for name, cfg in cfgs.items():
    cfg = dict(cfg)
    mode = cfg.pop("mode", "iceformer")
    params = native.AttnParams.default(**cfg) if mode == "iceformer" else None
    out[name] = native.attention(d["q"], d["k"], d["v"], d["mask"], float(d["scale"]), params, mode=mode)
np.savez(sys.argv[2], **out)
"""


def _data(mk, seed, hd=64):
    rng = np.random.default_rng(seed)
    n_kv, n_tok = 32 * 20 - 7, 9      # a cut last block; rows of 600+ scores: every exp path
    q = rng.standard_normal((1, 6, n_tok, hd)).astype(np.float32)
    k = np.stack([structured_keys(rng, n_kv, hd) for _ in range(2)])[None].astype(np.float16)
    v = rng.standard_normal((1, 2, n_kv, hd)).astype(np.float16)
    mask = make_mask(mk, n_kv, n_tok, 16, rng, np.float16)[None]
    return q, k, v, mask, 1.0 / np.sqrt(hd)


def _run(variant, path, tmp_path):
    env = dict(os.environ)
    env.pop("ICEFORMER_SIMD", None)
    if variant:
        env["ICEFORMER_SIMD"] = variant
    out = tmp_path / f"out-{variant or 'best'}.npz"
    subprocess.run([sys.executable, "-c", CHILD, str(path), str(out), repr(CONFIGS)], check=True, env=env)
    return np.load(out)


def _offered(best):
    """The variants this CPU can run, given the one picked without ICEFORMER_SIMD."""
    if best in AVX512_FORMS:
        return ORDER + AVX512_FORMS[1:]
    return ORDER[: ORDER.index(best) + 1]


@pytest.mark.parametrize("hd", [64, 128, 96])
def test_avx512_forms_agree_bit_for_bit(hd, tmp_path):
    """The 256-bit row kernels (picked on Zen 4) give exactly the 512-bit ones' results: the tiled prefill
    keys' scores must keep matching the row kernels' (ice_tiles_match_rows), and a run's output must not
    depend on the CPU's form. Head size 96 keeps the 512-bit dot products (the forms then mix)."""
    q, k, v, mask, scale = _data("causal", seed=7, hd=hd)
    path = tmp_path / "data.npz"
    np.savez(path, q=q, k=k, v=v, mask=mask, scale=scale)
    if str(_run(None, path, tmp_path)["variant"]) not in AVX512_FORMS:
        pytest.skip("no AVX-512 on this CPU")
    wide, narrow = (_run(form, path, tmp_path) for form in AVX512_FORMS)
    assert (str(wide["variant"]), str(narrow["variant"])) == tuple(AVX512_FORMS)
    for name in CONFIGS:
        assert np.array_equal(wide[name], narrow[name]), name
        assert np.isfinite(wide[name]).all() and np.abs(wide[name]).max() > 0, name


@pytest.mark.parametrize("mk", ["causal", "two_seq"])
def test_each_simd_variant_matches_references(mk, tmp_path):
    q, k, v, mask, scale = _data(mk, seed=4)
    path = tmp_path / "data.npz"
    np.savez(path, q=q, k=k, v=v, mask=mask, scale=scale)
    best = str(_run(None, path, tmp_path)["variant"])
    assert best in ORDER + AVX512_FORMS
    refs = {"dense": reference_attention(q, k, v, mask, scale),
            "blocks": block_search_reference(q, k, v, mask, scale, N_SEL, B, SINKS, WINDOW, group=True),
            "blocks-16": block_search_reference(q, k, v, mask, scale, 2 * N_SEL, B // 2, SINKS, WINDOW, group=True),
            "blocks-head": block_search_reference(q, k, v, mask, scale, N_SEL, B, SINKS, WINDOW)}
    refs["tail-cover"] = refs["dense"]
    for variant in _offered(best):
        got = _run(variant, path, tmp_path)
        assert str(got["variant"]) == variant
        for name, ref in refs.items():
            assert nmse(got[name], ref) < 1e-6, (variant, name)
