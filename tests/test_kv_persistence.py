"""The kernel's per-layer state across llama_decode calls and KV-cache edits.

With persistent=True the kernel keeps its block summaries (and, with top_k, the DCI index) across
calls, updates them for the cells each ubatch writes, and rebuilds them when the cache changes under
it; persistent=False rebuilds them on every call (the reference). Every scenario runs in a child
process (tests/kv_scenarios.py: one backend per process) on the bundled model with 2 threads, with
settings small enough that the kernel runs at these lengths (min_n_kv 32, every layer sparse):

- FULL attends every visible key (4096 blocks of 16 cells cover any cache here): dense attention in f32.
- SPARSE attends 4 sinks, the 16 most recent keys and the 2 best-scoring blocks of 16 cells, so a stale
  block summary changes which keys are attended.

What "equal" means here. The kernel computes each query row from its own visible keys, and a block
summary is a fixed-order sum over the block's cells; the rest of the graph gives the same bits for a
row whatever else is in the ubatch (measured: llama.cpp's dense path at n_ubatch 7 and 512). So the
same tokens in the same cells give the same logits bit for bit, however they were fed and whatever
the cache went through before; that is asserted wherever it holds by construction. Where the cells or
the attention path differ, logits agree only up to rounding, and this 30-layer model amplifies
rounding a lot: llama.cpp's own dense kernels (flash attention on/off) differ by a median
max|dlogit|/std of about 0.19 over a prompt and by up to 0.65 over the tokens a scenario decodes
(measured; ROUNDING_TOL below).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCENARIOS_PY = Path(__file__).with_name("kv_scenarios.py")

BASE = dict(min_n_kv=32, n_sinks=4, window=16, block_size=16, top_k=0, tail_estimate=False, dense_layers=[])
FULL = dict(BASE, top_blocks=4096)
SPARSE = dict(BASE, top_blocks=2)
# k-NN search through the DCI index (also kept across calls), 16 keys per query. Every simple index
# walks all keys (visit_budget >= n_kv), so the search is exact by construction and the persistent
# index must give the rebuilt one's bits; it is checked for holding every cell once, not for the
# quality of its projections (a persistent index keeps the embedding of its last build, so with the
# automatic budgets it legitimately finds other keys than a rebuilt one at long contexts).
DCI = dict(BASE, top_blocks=0, top_k=16, visit_budget=4096)

# Bound on max|dlogit|/std over the 4 to 46 rows a scenario records, where the cells or the attention
# path differ (rounding only). Measured: 0.24 to 0.45 for iceformer at full coverage against dense on
# the same cache or against a context with other cell placement; 0.35 to 0.65 between llama.cpp's own
# dense kernels (flash attention on/off) in the same scenarios. A context that also sees 84 removed
# keys is off by about 5 (the negative control, test_rounding_bound_separates_a_wrong_cache).
ROUNDING_TOL = 1.0


def run_scenarios(tmp_path, runs: dict, tag: str = "runs", timeout: int = 300) -> dict:
    """Runs {name: run} in one child; returns {name: recorded logits, name.rss: ..., ...}."""
    spec, out = tmp_path / f"{tag}.json", tmp_path / f"{tag}.npz"
    spec.write_text(json.dumps({"runs": runs}))
    proc = subprocess.run([sys.executable, str(SCENARIOS_PY), str(spec), str(out)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def rel_error(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per row: max |dlogit| over the vocabulary, in units of the reference's std (test_dense_identity's)."""
    assert ref.shape == got.shape, (ref.shape, got.shape)
    return np.abs(ref - got).max(axis=1) / ref.std()


def ice(settings: dict, persistent: bool = True) -> dict:
    return {"attention": "iceformer", "settings": dict(settings, persistent=persistent)}


def bitwise(ref: np.ndarray, got: np.ndarray) -> None:
    assert ref.shape == got.shape and np.isfinite(got).all()
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32)), f"max|dlogit|/std per row: {rel_error(ref, got)}"


# -- 1. decoding across ubatch sizes -----------------------------------------------------------------

UBATCHES = (1, 7, 512)
PROMPT = 256          # n_kv 256 (llama.cpp pads it to 256); the 8 decoded tokens make it 512
FEED = [["decode", 0, ["A", 0, PROMPT], 0, 8],            # records every 8th prompt row and the last
        ["step", 0, ["A", PROMPT, PROMPT + 8], PROMPT]]    # 8 one-token decodes, each recorded


def ubatch_results(tmp_path) -> dict:
    runs = {"dense": {"ctx": {"n_ctx": 512}, "attention": "dense", "steps": FEED},
            "dense-fa": {"ctx": {"n_ctx": 512, "flash_attn": True}, "attention": "dense", "steps": FEED}}
    for fa in (False, True):
        for u in UBATCHES:
            ctx = {"n_ctx": 512, "n_batch": 512, "n_ubatch": u, "flash_attn": fa}   # fa: V not transposed
            tag = f"{'-fa' if fa else ''}-u{u}"
            if not fa or u == 512:
                runs["full" + tag] = dict(ice(FULL), ctx=ctx, steps=FEED)
            runs["sparse" + tag] = dict(ice(SPARSE), ctx=ctx, steps=FEED)
        runs[f"sparse-rebuilt{'-fa' if fa else ''}-u1"] = dict(
            ice(SPARSE, persistent=False), ctx={"n_ctx": 512, "n_ubatch": 1, "flash_attn": fa}, steps=FEED)
    runs["sparse-3-blocks"] = dict(ice(dict(SPARSE, top_blocks=3)), ctx={"n_ctx": 512}, steps=FEED)
    for u in (1, 512):
        runs[f"dci-u{u}"] = dict(ice(DCI), ctx={"n_ctx": 512, "n_ubatch": u}, steps=FEED)
    runs["exact-search"] = dict(ice(dict(DCI, exact_search=True)), ctx={"n_ctx": 512}, steps=FEED)
    # dense_prefill: the prompt ubatch runs upstream and only feeds the state; against a context that
    # ran the prompt dense and switched to iceformer (its state rebuilt from the cache)
    for name, knobs in (("sparse", SPARSE), ("dci", DCI)):
        dp = dict(knobs, dense_prefill=True)
        runs[f"{name}-dp"] = dict(ice(dp), ctx={"n_ctx": 512}, steps=FEED)
        runs[f"{name}-switched"] = {"ctx": {"n_ctx": 512}, "attention": "dense", "settings": dict(dp, persistent=True),
                                    "steps": [FEED[0], ["attention", "iceformer", None], FEED[1]]}
    runs["sparse-dp-u1"] = dict(ice(dict(SPARSE, dense_prefill=True)), ctx={"n_ctx": 512, "n_ubatch": 1}, steps=FEED)
    return run_scenarios(tmp_path, runs)


@pytest.fixture(scope="module")
def ubatch_runs(builds, bundled_model, tmp_path_factory):
    return ubatch_results(tmp_path_factory.mktemp("ubatch"))


@pytest.mark.parametrize("u", UBATCHES)
def test_full_coverage_decoding_matches_dense_at_every_ubatch_size(ubatch_runs, u):
    """As test_dense_identity: no further from dense than dense (flash attention off) is from dense
    with flash attention on, in median over the rows, with top-1 agreement within 3 points."""
    dense, dense_fa, full = ubatch_runs["dense"], ubatch_runs["dense-fa"], ubatch_runs[f"full-u{u}"]
    assert np.isfinite(full).all()
    assert not np.array_equal(dense, full), "the iceformer path did not run"
    baseline = float(np.median(rel_error(dense, dense_fa)))
    assert 0 < baseline < 1
    assert float(np.median(rel_error(dense, full))) <= 1.25 * baseline
    assert (dense.argmax(1) == full.argmax(1)).mean() >= (dense.argmax(1) == dense_fa.argmax(1)).mean() - 0.03


@pytest.mark.parametrize("fa", [False, True], ids=["v_transposed", "flash_attn"])
def test_kernel_logits_do_not_depend_on_the_ubatch_size(ubatch_runs, fa):
    """The same tokens fed in ubatches of 1, 7 or 512 (the state carried across ubatches and calls)
    give the same bits at full coverage and sparse (flash attention: sparse only), and the rebuilt
    state agrees. (llama.cpp's own
    dense path does not: its one-token ubatches take another kernel, measured 0.19 median apart.)"""
    r, fa = ubatch_runs, "-fa" if fa else ""
    for kind in ("full", "sparse") if not fa else ("sparse",):
        for u in UBATCHES[1:]:
            bitwise(r[f"{kind}{fa}-u{UBATCHES[0]}"], r[f"{kind}{fa}-u{u}"])
    bitwise(r[f"sparse-rebuilt{fa}-u1"], r[f"sparse{fa}-u1"])
    # negative controls: the sparse setting drops keys that matter, and one more block changes bits
    assert rel_error(r[f"full{fa}-u512"], r[f"sparse{fa}-u512"]).max() > ROUNDING_TOL
    assert not np.array_equal(r["sparse-3-blocks"], r["sparse-u512"])


def test_dci_index_updated_per_token_holds_every_key(ubatch_runs):
    """One-token ubatches insert each key into the persistent index; with exhaustive budgets the search
    must then return exactly the brute-force top-k, as an index built in one go does."""
    r = ubatch_runs
    bitwise(r["exact-search"], r["dci-u512"])
    bitwise(r["exact-search"], r["dci-u1"])
    assert rel_error(r["full-u512"], r["dci-u1"]).max() > ROUNDING_TOL   # top-16 is not every key


PROMPT_ROWS = PROMPT // 8 + 1   # FEED's prompt decode records rows 0, 8, ..., 248 and the last


def test_dense_prefill_is_exact_and_leaves_a_current_state(ubatch_runs):
    """dense_prefill: the prompt's rows are dense's bits, and the decode steps after it are those of a
    context whose state was rebuilt from the same cache (the prompt ubatch fed the block summaries and
    the DCI index as a sparse ubatch would); one-token ubatches still run the kernel."""
    r = ubatch_runs
    for name in ("sparse", "dci"):
        bitwise(r["dense"][:PROMPT_ROWS], r[f"{name}-dp"][:PROMPT_ROWS])
        bitwise(r[f"{name}-switched"], r[f"{name}-dp"])
        assert not np.array_equal(r["dense"][PROMPT_ROWS:], r[f"{name}-dp"][PROMPT_ROWS:]), "decoding ran dense"
    bitwise(r["sparse-u1"], r["sparse-dp-u1"])   # a prompt fed one token at a time is decoded sparse
    assert rel_error(r["dense"][:PROMPT_ROWS], r["sparse-u512"][:PROMPT_ROWS]).max() > ROUNDING_TOL  # control


# -- 2, 3. cache edits ------------------------------------------------------------------------------
#
# A scenario: `steps` (decodes, an edit, then recorded one-token decodes) and its reference:
#   fresh:  fresh contexts, one per list of steps, whose recorded rows concatenated are what the edited
#           context must record; they hold the same tokens in the same cells, so the logits must be the
#           same bits, at full coverage and sparse (a fresh context's state is built from scratch);
#   relaid: the same, but the edited context holds the tokens in other cells: full coverage only,
#           within ROUNDING_TOL (sparse blocks hold other keys there, legitimately);
#   dense:  dense attention on the same steps, where no fresh context can hold the same cache (after
#           a position shift the kept tokens' K/V were computed with the removed ones in context;
#           holes in positions cannot be fed): full coverage within ROUNDING_TOL.
# Every scenario also runs SPARSE with persistent=False: the persistent state must match it bit for bit;
# so must the persistent DCI index in the scenarios marked dci (edits that rewrite or reuse cells).

P = 240                                  # prompt: cells 0..239, n_kv 256
PRE = [["decode", 0, ["A", 0, P], 0, "none"], ["step", 0, ["A", P, P + 4], P, False]]   # + 4 incremental
NEW = ["B", 0, 20]    # the recorded continuation (another text): 20 tokens, so blocks of 16 fill up
TWO = {"n_ctx": 1024, "n_seq_max": 2}


def cont(pos0, seq=0):
    return [["step", seq, NEW, pos0]]


SCENARIOS = {
    # cell reuse: the tail is removed and its cells are written again by new tokens
    "seq_rm_tail_reuse": dict(
        steps=PRE + [["rm", 0, 160, -1]] + cont(160),
        fresh=[[["decode", 0, ["A", 0, 160], 0, "none"]] + cont(160)]),
    # a hole in the middle, filled by the next tokens (cells 80..119 reused at positions 244..283)
    "seq_rm_middle_fill": dict(
        steps=PRE + [["rm", 0, 80, 120], ["step", 0, ["B", 0, 46], P + 4]], dense=True),
    # (after a clear every visible cell is written again, so a state that missed the clear would give
    # the same logits: this checks that decoding after a clear works, not that it invalidates)
    "memory_clear": dict(
        steps=PRE + [["clear", True], ["decode", 0, ["B", 10, 110], 0, "none"], ["step", 0, NEW, 100]],
        fresh=[[["decode", 0, ["B", 10, 110], 0, "none"], ["step", 0, NEW, 100]]]),
    # the state saved after A is loaded over a cache (and a kernel state) that hold another text
    "state_load": dict(
        dci=True,
        steps=PRE + [["save", "a"], ["rm", 0, -1, -1], ["decode", 0, ["B", 0, P + 4], 0, "none"],
                     ["step", 0, ["B", P + 4, P + 8], P + 4, False], ["load", "a"]] + cont(P + 4),
        fresh=[PRE + cont(P + 4)]),
    # the same with one sequence's state (llama_state_seq_*)
    "state_seq_load": dict(
        steps=PRE + [["seq_save", 0, "a"], ["rm", 0, -1, -1], ["decode", 0, ["B", 0, P + 4], 0, "none"],
                     ["step", 0, ["B", P + 4, P + 8], P + 4, False], ["seq_load", "a", 0]] + cont(P + 4),
        fresh=[PRE + cont(P + 4)]),
    # llama.cpp's context shift: keep 4, drop 100, shift the rest back (a K-shift of every kept cell)
    "context_shift": dict(
        dci=True,
        steps=PRE + [["rm", 0, 4, 104], ["add", 0, 104, -1, -100]] + cont(P + 4 - 100), dense=True),
    "context_shift_flash_attn": dict(
        ctx={"flash_attn": True},
        steps=PRE + [["rm", 0, 4, 104], ["add", 0, 104, -1, -100]] + cont(P + 4 - 100), dense=True),
    "seq_add_forward": dict(
        steps=PRE + [["add", 0, 100, -1, 37]] + cont(P + 4 + 37), dense=True),
    # positions 120..243 become 60..121 (pairs share a position)
    "seq_div": dict(
        steps=PRE + [["div", 0, 120, -1, 2]] + cont(122), dense=True),
    # decodes that skip the kernel (dense in between) write cells the kernel state did not see: cells
    # 240..259, so that block 15 (cells 240..255) is not rewritten when the kernel resumes at cell 260
    "dense_interlude": dict(
        steps=[["decode", 0, ["A", 0, P], 0, "none"], ["attention", "dense", None],
               ["step", 0, ["A", P, P + 20], P, False], ["attention", "iceformer", None]] + cont(P + 20),
        dense=True),
    # the cache shrinks below min_n_kv (upstream attention then writes cells 200..255) and grows past
    # it again; A[0:200] is fed while n_kv is 256 so that both contexts compute its K/V upstream
    "below_min_n_kv": dict(
        dci=True,
        settings=dict(min_n_kv=257),
        steps=[["decode", 0, ["A", 0, 200], 0, "none"], ["decode", 0, ["A", 200, 300], 200, "none"],
               ["step", 0, ["A", 300, 304], 300, False], ["rm", 0, 200, -1],
               ["step", 0, ["B", 0, 56], 200, False], ["step", 0, ["B", 56, 62], 256]],
        fresh=[[["decode", 0, ["A", 0, 200], 0, "none"], ["step", 0, ["B", 0, 56], 200, False],
                ["step", 0, ["B", 56, 62], 256]]]),
    # unified cache: seq 1 shares seq 0's cells (metadata only) and goes on from there
    "seq_cp_unified": dict(
        ctx=TWO,
        steps=PRE + [["cp", 0, 1, -1, -1]] + cont(P + 4, seq=1),
        fresh=[PRE + cont(P + 4)]),
    # one stream per sequence: seq_cp copies stream 0's buffers over stream 1, which held another text
    "seq_cp_streams": dict(
        ctx=dict(TWO, kv_unified=False),
        steps=[["decode", 1, ["B", 0, P + 20], 0, "none"], ["step", 1, ["B", P + 20, P + 24], P + 20, False]]
        + PRE + [["cp", 0, 1, -1, -1]] + cont(P + 4, seq=1),
        fresh=[PRE + cont(P + 4)]),
    # two sequences interleaved in one ubatch, then seq_keep drops seq 1; seq 0's next tokens reuse
    # its cells, so seq 0's keys sit in other cells than in a fresh context
    "seq_keep": dict(
        ctx=TWO,
        steps=[["mixed", [[0, ["A", 0, 160], 0], [1, ["B", 0, 120], 0]], "none"], ["keep", 0],
               ["step", 0, ["A", 160, 166], 160]],
        relaid=[[["decode", 0, ["A", 0, 160], 0, "none"], ["step", 0, ["A", 160, 166], 160]]]),
}


def scenario_runs(name: str) -> dict:
    sc = SCENARIOS[name]
    ctx = dict({"n_ctx": 512}, **sc.get("ctx", {}))
    full, sparse = dict(FULL, **sc.get("settings", {})), dict(SPARSE, **sc.get("settings", {}))
    runs = {"full": dict(ice(full), ctx=ctx, steps=sc["steps"]),
            "sparse": dict(ice(sparse), ctx=ctx, steps=sc["steps"]),
            "sparse-rebuilt": dict(ice(sparse, persistent=False), ctx=ctx, steps=sc["steps"])}
    if sc.get("dci"):
        dci = dict(DCI, **sc.get("settings", {}))
        runs["dci"] = dict(ice(dci), ctx=ctx, steps=sc["steps"])
        runs["dci-rebuilt"] = dict(ice(dci, persistent=False), ctx=ctx, steps=sc["steps"])
    if sc.get("dense"):
        steps = [s for s in sc["steps"] if s[0] != "attention"]
        runs["dense"] = {"ctx": ctx, "attention": "dense", "steps": steps}
    fresh_ctx = {"n_ctx": 512, "flash_attn": ctx.get("flash_attn", False)}
    for i, steps in enumerate(sc.get("fresh", [])):
        runs[f"fresh{i}-full"] = dict(ice(full), ctx=fresh_ctx, steps=steps)
        runs[f"fresh{i}-sparse"] = dict(ice(sparse), ctx=fresh_ctx, steps=steps)
    for i, steps in enumerate(sc.get("relaid", [])):
        runs[f"fresh{i}-full"] = dict(ice(full), ctx=fresh_ctx, steps=steps)
    return runs


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request, builds, bundled_model, tmp_path_factory):
    name = request.param
    return name, run_scenarios(tmp_path_factory.mktemp(name), scenario_runs(name))


def _fresh(r: dict, kind: str) -> np.ndarray:
    return np.concatenate([r[k] for k in sorted(r) if k.startswith("fresh") and k.endswith("-" + kind)])


def test_cache_edit_then_decode_matches_the_reference(scenario):
    name, r = scenario
    sc, full = SCENARIOS[name], r["full"]
    assert np.isfinite(full).all()
    if "fresh" in sc:
        bitwise(_fresh(r, "full"), full)
        bitwise(_fresh(r, "sparse"), r["sparse"])
    else:
        ref = r["dense"] if sc.get("dense") else _fresh(r, "full")
        err = rel_error(ref, full)
        assert err.max() <= ROUNDING_TOL, err


def test_persistent_state_is_bitwise_the_rebuilt_state(scenario):
    name, r = scenario
    bitwise(r["sparse-rebuilt"], r["sparse"])
    # the sparse selection matters in this scenario (else the equality above says little)
    assert not np.array_equal(r["sparse"], r["full"])
    if SCENARIOS[name].get("dci"):
        bitwise(r["dci-rebuilt"], r["dci"])


def test_rounding_bound_separates_a_wrong_cache(builds, bundled_model, tmp_path):
    """Negative control of ROUNDING_TOL: the tail-removal scenario against a context in which the
    removed cells stayed visible (the continuation fed after them instead)."""
    runs = {"edited": dict(ice(FULL), ctx={"n_ctx": 512}, steps=SCENARIOS["seq_rm_tail_reuse"]["steps"]),
            "wrong": dict(ice(FULL), ctx={"n_ctx": 512}, steps=PRE + cont(P + 4))}
    r = run_scenarios(tmp_path, runs)
    assert rel_error(r["wrong"], r["edited"]).max() > 3 * ROUNDING_TOL


# -- 4. two sequences in one context ----------------------------------------------------------------

TWO_STEPS = [["mixed", [[0, ["A", 0, 200], 0], [1, ["B", 0, 150], 0]], "none"]]   # interleaved; ubatches of 64
for _k in range(4):
    TWO_STEPS += [["step", 0, ["A", 200 + _k, 201 + _k], 200 + _k], ["step", 1, ["B", 150 + _k, 151 + _k], 150 + _k]]
ALONE = {"A": [["decode", 0, ["A", 0, 200], 0, "none"], ["step", 0, ["A", 200, 204], 200]],
         "B": [["decode", 0, ["B", 0, 150], 0, "none"], ["step", 0, ["B", 150, 154], 150]]}


@pytest.mark.parametrize("unified", [True, False], ids=["kv_unified", "stream_per_seq"])
def test_two_sequences_do_not_see_each_other(builds, bundled_model, tmp_path, unified):
    ctx = {"n_ctx": 1024, "n_seq_max": 2, "n_ubatch": 64, "kv_unified": unified}
    runs = {}
    for kind, settings in (("full", FULL), ("sparse", SPARSE)):
        runs[f"two-{kind}"] = dict(ice(settings), ctx=ctx, steps=TWO_STEPS)
        for text, steps in ALONE.items():
            runs[f"{text}-{kind}"] = dict(ice(settings), ctx={"n_ctx": 512}, steps=steps)
    r = run_scenarios(tmp_path, runs)
    for kind in ("full", "sparse"):
        two = r[f"two-{kind}"]
        for text, rows in (("A", two[0::2]), ("B", two[1::2])):
            alone = r[f"{text}-{kind}"]
            if not unified:
                # one stream per sequence: each has its own cells, blocks and kernel state, and both
                # streams pad n_kv to 256, so the other sequence changes no bit, sparse included
                bitwise(alone, rows)
            elif kind == "full":
                # one cache: the sequences' cells interleave (other cells than alone: rounding only)
                err = rel_error(alone, rows)
                assert err.max() <= ROUNDING_TOL, (text, err)
            # unified and sparse: a block of cells mixes both sequences' keys, so the selection
            # legitimately depends on the other sequence; not compared
    # negative control: the two texts' logits differ by far more than the bound
    assert rel_error(r["A-full"], r["B-full"]).max() > 3 * ROUNDING_TOL


# -- 5. a long run with context shift ---------------------------------------------------------------

LONG_TOKENS = 1500
RSS_BOUND = 8 << 20   # bytes of RSS growth allowed from token 500 to the end (measured: under 0.1 MiB)


def test_long_run_with_context_shift_keeps_memory_bounded(builds, bundled_model, tmp_path):
    """1500 greedy tokens in a 512-cell cache: the cache fills and is shifted (keep 4, drop half, shift
    the rest back) about every 250 tokens, so cells are reused and every kept key re-rotated. Memory,
    sampled every 100 tokens, must stop growing once the cache has been full (first shift: token 448);
    the first 600 tokens (a shift and 150 reused cells) must be those of the rebuilt state, bit for bit."""
    start = [["decode", 0, ["A", 0, 64], 0, "none"], ["step", 0, ["A", 64, 65], 64]]
    runs = {"long": dict(ice(SPARSE), ctx={"n_ctx": 512}, steps=start + [["shift_run", 0, LONG_TOKENS, 65, 4]]),
            "rebuilt": dict(ice(SPARSE, persistent=False), ctx={"n_ctx": 512},
                            steps=start + [["shift_run", 0, 600, 65, 4]]),
            "leak": {"ctx": {"n_ctx": 256}, "attention": "dense",
                     "steps": [["sample"], ["leak", 2 * RSS_BOUND], ["sample"]]}}
    r = run_scenarios(tmp_path, runs, timeout=600)
    rss, kernel, logits = r["long.rss"], r["long.ice_memory"], r["long"]
    assert len(rss) == LONG_TOKENS // 100 and logits.shape[0] == 1 + LONG_TOKENS // 100
    assert np.isfinite(logits).all()
    bitwise(r["rebuilt"], logits[:7])
    assert kernel[4] > 0, "the kernel did not run"
    assert kernel[4:].max() <= kernel[4], kernel          # the kernel's own accounting does not grow
    assert rss[-1] - rss[4] < RSS_BOUND, rss
    # negative control: the same measurement sees a deliberate leak of twice the bound
    assert r["leak.rss"][1] - r["leak.rss"][0] >= RSS_BOUND
