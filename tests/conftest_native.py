"""Shared helpers of the native tests: the compiled module, a float64 reference, masks, data.

Not a conftest.py (the project's conftest.py is elsewhere): the tests import it by name.
"""

import importlib
import itertools

import numpy as np


def load_native():
    """iceformer_llama.runtime.native, building the cffi module in place first if it is missing."""
    try:
        return importlib.import_module("iceformer_llama.runtime.native")
    except ImportError:
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sys.path.insert(0, os.path.join(root, "iceformer_llama"))
        try:
            import _native_build
        finally:
            sys.path.pop(0)
        _native_build.build_in_place()
        importlib.invalidate_caches()
        return importlib.import_module("iceformer_llama.runtime.native")


def reference_attention(q, k, v, mask, scale):
    """float64 dense attention. q (S,H,T,D), k (S,Hk,N,D), v (S,Hk,N,Dv), mask (S|1,R>=T,N).
    Rows with no visible key give zeros. Returns (S,T,H,Dv)."""
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    v = v.astype(np.float64)
    S, H, T, _ = q.shape
    G = H // k.shape[1]
    k = np.repeat(k, G, axis=1)
    v = np.repeat(v, G, axis=1)
    m = mask.astype(np.float64)[:, :T, :]                    # (S|1, T, N)
    sc = np.einsum("shtd,shnd->shtn", q, k) * scale + m[:, None, :, :]
    vis = np.isfinite(sc)
    mx = np.where(vis, sc, -np.inf).max(axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    p = np.where(vis, np.exp(sc - mx), 0.0)
    den = p.sum(axis=-1, keepdims=True)
    out = np.einsum("shtn,shnd->shtd", p, v) / np.where(den > 0, den, 1.0)
    return out.transpose(0, 2, 1, 3)


def nmse(out, ref):
    out = np.asarray(out, dtype=np.float64)
    den = float(np.sum(ref * ref))
    err = float(np.sum((out - ref) ** 2))
    return err / den if den > 0 else err


def make_mask(kind, n_kv, n_tok, n_rows, rng, dtype=np.float32):
    """(n_rows, n_kv) mask; rows >= n_tok are padding (all hidden). The ubatch's tokens sit at
    the last n_tok positions of the cache (cells 0..n_kv-1 in order).
      causal:  row t sees cells j <= n_kv - n_tok + t
      two_seq: cells alternate between sequence 0 and 1, row t is in sequence t % 2 and sees its
               own sequence's cells j <= n_kv - n_tok + t
      single:  row t sees exactly one random cell
      random:  each cell visible with probability 0.6; every 5th row sees nothing
    """
    m = np.full((n_rows, n_kv), -np.inf, dtype=np.float64)
    base = n_kv - n_tok
    j = np.arange(n_kv)
    for t in range(n_tok):
        if kind == "causal":
            m[t, j <= base + t] = 0
        elif kind == "two_seq":
            m[t, (j <= base + t) & (j % 2 == t % 2)] = 0
        elif kind == "single":
            m[t, rng.integers(0, n_kv)] = 0
        elif kind == "random":
            if t % 5 != 4:
                m[t, rng.random(n_kv) < 0.6] = 0
        else:
            raise ValueError(kind)
    return m.astype(dtype)


def structured_keys(rng, n, d, rank=8, n_big=2):
    """Attention-like keys: a low-rank part, noise, a shared offset and a few large-norm
    directions carried by a minority of keys."""
    basis = rng.standard_normal((rank, d))
    k = rng.standard_normal((n, rank)) @ basis * 0.7 + 0.35 * rng.standard_normal((n, d))
    k += 0.8 * rng.standard_normal(d)                       # keys share a mean offset
    big = rng.standard_normal((n_big, d)) * 3.0
    sel = rng.random(n) < 0.05
    k[sel] += big[rng.integers(0, n_big, sel.sum())]
    return k.astype(np.float32)


def block_search_reference(q, k, v, mask, scale, n_sel, B, sinks, window, group=False, share=0.0):
    """The coarse block search spelled out in float64 (tail estimate off, min_n_kv 0): per row and head,
    softmax over the first `sinks` and last `window` visible cells plus the visible cells of the n_sel
    best blocks. A block seen whole scores q.mean + 2 sqrt(q^2 . var) over its keys (mean and var rounded
    to fp16), one the mask cuts its best visible q.k; blocks with nothing visible or nothing outside the
    union are not chosen; ties go to the lower block. group: the heads sharing a KV head rank blocks
    together, by the largest over the group's heads of (score - that head's best whole-block score).
    share: a row attends at least ceil(share x the blocks it can choose) blocks (block_share, as a C float)."""
    S, H, T, _ = q.shape
    G, N = H // k.shape[1], k.shape[2]
    out = np.zeros((S, T, H, v.shape[-1]))
    nb = (N + B - 1) // B

    def scores(s, t, h, m):
        qq, kk = q[s, h, t].astype(np.float64), k[s, h // G].astype(np.float64)
        sc = np.full(nb, -np.inf)
        whole = np.zeros(nb, bool)
        for b in range(nb):
            cells = np.arange(b * B, min((b + 1) * B, N))
            seen = cells[np.isfinite(m[cells])]
            if len(seen) == len(cells):
                kb = kk[cells]
                # the kernel keeps the block's mean and variance in fp16 (its ranking rows)
                mean = kb.mean(0).astype(np.float16).astype(np.float64)
                var = ((kb - kb.mean(0)) ** 2).mean(0).astype(np.float16).astype(np.float64)
                sc[b], whole[b] = mean @ qq + 2 * np.sqrt((qq * qq) @ var), True
            elif len(seen):
                sc[b] = (kk[seen] @ qq).max()
        return sc, whole

    for s, t, h in itertools.product(range(S), range(T), range(H)):
        qq, kk, vv = q[s, h, t].astype(np.float64), k[s, h // G].astype(np.float64), v[s, h // G].astype(np.float64)
        m = mask[min(s, mask.shape[0] - 1), t].astype(np.float64)
        vis = np.flatnonzero(np.isfinite(m))
        if len(vis) == 0:
            continue
        union = set(vis.tolist()) if len(vis) <= sinks + window else set(vis[:sinks].tolist()) | set(vis[len(vis) - window:].tolist())
        if len(vis) > sinks + window:
            if group:
                rank = np.full(nb, -np.inf)
                for hh in range(h - h % G, h - h % G + G):
                    sc, whole = scores(s, t, hh, m)
                    rank = np.maximum(rank, sc - (sc[whole].max() if whole.any() else 0.0))
            else:
                rank = scores(s, t, h, m)[0]
            ranked = []
            for b in range(nb):
                cells = np.arange(b * B, min((b + 1) * B, N))
                seen = cells[np.isfinite(m[cells])]
                if len(seen) == 0 or (len(seen) == len(cells) and union.issuperset(cells.tolist())):
                    continue
                ranked.append((-rank[b], b, seen.tolist()))
            n_row = max(n_sel, int(np.ceil(float(np.float32(share)) * len(ranked))))
            for _, _, seen in sorted(ranked)[:n_row]:
                union |= set(seen)
        cells = np.array(sorted(union))
        sc = scale * (kk[cells] @ qq) + m[cells]
        p = np.exp(sc - sc.max())
        out[s, t, h] = p @ vv[cells] / p.sum()
    return out


def block_search_data(n_kv, n_tok, gqa, mk, seed, n_head_kv=2):
    """q, k, v, mask, scale for the block-search tests: structured keys (so blocks differ), random queries
    and values, a mask of kind `mk` (make_mask) with the rows rounded up as llama.cpp pads them."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, n_head_kv * gqa, n_tok, 64)).astype(np.float32)
    k = np.stack([structured_keys(rng, n_kv, 64) for _ in range(n_head_kv)])[None]
    v = rng.standard_normal((1, n_head_kv, n_kv, 64)).astype(np.float32)
    n_rows = (n_tok + 7) // 8 * 8 + (1 if n_tok % 8 == 0 else 0)
    mask = make_mask(mk, n_kv, n_tok, n_rows, rng, np.float32)[None]
    return q, k, v, mask, 1.0 / 8.0


def block_search_params(native, B, sinks, window, **kw):
    """The block search alone at a fixed count (block_share 0, no k-NN, no tail estimate, every row sparse),
    then the knobs in kw."""
    base = dict(top_k=0, block_size=B, n_sinks=sinks, window=window, min_n_kv=0, tail_estimate=False,
                block_share=0.0)
    return native.AttnParams.default(**{**base, **kw})
