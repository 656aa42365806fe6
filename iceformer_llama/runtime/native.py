"""Checked Python wrappers over the native library (native/include/iceformer.h).

The compiled module is iceformer_llama._iceformer_native (cffi, API mode; built by
iceformer_llama/_native_build.py). cffi releases the GIL around every native call.

Array layouts (numpy C order; the C side receives them as ggml-style views, so any
positive strides are accepted for q, k and v):
  q:    float32            (n_stream, n_head, n_tokens, d_k)   or (n_head, n_tokens, d_k)
  k:    float16 | float32  (n_stream, n_head_kv, n_kv, d_k)    or (n_head_kv, n_kv, d_k)
  v:    float16 | float32  (n_stream, n_head_kv, n_kv, d_v)    or (n_head_kv, n_kv, d_v);
        with v_transposed=True: (..., n_head_kv, d_v, n_kv) (llama.cpp's transposed V cache)
  mask: float16 | float32  (n_stream or 1, n_rows >= n_tokens, n_kv) or (n_rows, n_kv);
        0 = visible, -inf = hidden
  out:  float32            (n_stream, n_tokens, n_head, d_v)   or (n_tokens, n_head, d_v)
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from ..errors import IceformerError

try:
    from .._iceformer_native import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "iceformer_llama._iceformer_native is not built: run `pip install -e .` "
        "or `python iceformer_llama/_native_build.py`"
    ) from exc


class NativeError(IceformerError):
    """A native call returned a status other than ICE_STATUS_OK."""

    def __init__(self, status: int, what: str):
        self.status = int(status)
        self.what = what
        super().__init__(f"{what}: {status_str(status)} (status {int(status)})")


def status_str(status: int) -> str:
    # const char * ice_status_str(enum ice_status status);
    return ffi.string(lib.ice_status_str(status)).decode()


def simd_variant() -> str:
    """The SIMD variant of this process's kernels: "avx512", "avx512-ymm" (the same results, rows converted
    256 bits at a time: AMD Zen 4), "avx2" or "scalar"."""
    # const char * ice_simd_name(void);
    return ffi.string(lib.ice_simd_name()).decode()


def _check(status: int, what: str) -> None:
    if status != lib.ICE_STATUS_OK:
        raise NativeError(status, what)


_KINDS = {"dci": lib.ICE_INDEX_DCI, "exact": lib.ICE_INDEX_EXACT}
_TYPES = {np.dtype(np.float32): lib.ICE_TYPE_F32, np.dtype(np.float16): lib.ICE_TYPE_F16}


class _Owned:
    """Owner of one native object: freed once, by close(), at the end of a `with` block, or when collected."""

    _what = "object"   # named in the error for a closed one

    def _handle(self):
        ptr = getattr(self, "_ptr", None)
        if ptr is None:
            raise ValueError(f"the {self._what} is closed")
        return ptr

    def _free(self, ptr) -> None:
        raise NotImplementedError

    def close(self) -> None:
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr is not None:
            self._free(ptr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


# ---------------------------------------------------------------------------
# Index
# ---------------------------------------------------------------------------


class Index(_Owned):
    """Maximum inner product index over `dim`-dimensional float32 keys.

    kind="dci" is Prioritized DCI (approximate), kind="exact" brute force. Budgets of 0
    (the default) are automatic. Use as a context manager or call close().
    """

    def __init__(self, dim: int, *, kind: str = "dci", n_composite: int | None = None,
                 n_simple: int | None = None, visit_budget: int | None = None,
                 retrieve_budget: int | None = None, seed: int | None = None):
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, not {kind!r}")
        # struct ice_index_params ice_index_default_params(void);
        p = lib.ice_index_default_params()
        p.kind = _KINDS[kind]
        p.dim = int(dim)
        for name, val in (("n_composite", n_composite), ("n_simple", n_simple), ("visit_budget", visit_budget),
                          ("retrieve_budget", retrieve_budget), ("seed", seed)):
            if val is not None:
                setattr(p, name, int(val))
        self.dim = int(dim)
        self.kind = kind
        out = ffi.new("struct ice_index **")
        # enum ice_status ice_index_init(const struct ice_index_params * params, struct ice_index ** out);
        _check(lib.ice_index_init(ffi.new("struct ice_index_params *", p), out), "ice_index_init")
        self._ptr = out[0]
        self._lock = threading.Lock()

    _what = "index"

    def add(self, keys, ids=None) -> None:
        """Adds keys (n, dim) float32; ids (n,) int64 >= 0, or None for size()..size()+n-1."""
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (n, {self.dim}), got {keys.shape}")
        n = keys.shape[0]
        ids_ptr = ffi.NULL
        if ids is not None:
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            if ids.shape != (n,):
                raise ValueError(f"ids must have shape ({n},), got {ids.shape}")
            ids_ptr = ffi.cast("int64_t *", ids.ctypes.data)
        with self._lock:
            # enum ice_status ice_index_add(struct ice_index *, int64_t n, const float * keys, const int64_t * ids);
            _check(lib.ice_index_add(self._handle(), n, ffi.cast("float *", keys.ctypes.data), ids_ptr), "ice_index_add")

    def search(self, query, k: int, mask=None):
        """Top-k by inner product. query (dim,) or (nq, dim); mask: a visibility row
        (n,) float32/float16, 0 = visible, -inf = hidden, ids >= n hidden.
        Returns (labels int64, scores float32), shaped (k,) or (nq, k), padded with -1 / -inf."""
        q = np.ascontiguousarray(query, dtype=np.float32)
        single = q.ndim == 1
        q2 = q[None, :] if single else q
        if q2.ndim != 2 or q2.shape[1] != self.dim:
            raise ValueError(f"query must have shape ({self.dim},) or (nq, {self.dim}), got {q.shape}")
        k = int(k)
        if k <= 0:
            raise ValueError("k must be positive")
        filt = ffi.NULL
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype not in _TYPES:
                m = m.astype(np.float32)
            m = np.ascontiguousarray(m)
            if m.ndim != 1:
                raise ValueError("mask must be one row (n,)")
            filt = ffi.new("struct ice_filter *")
            filt.mask = ffi.cast("void *", m.ctypes.data)
            filt.type = _TYPES[m.dtype]
            filt.n = m.shape[0]
        labels = np.empty((q2.shape[0], k), dtype=np.int64)
        scores = np.empty((q2.shape[0], k), dtype=np.float32)
        n_found = ffi.new("int32_t *")
        with self._lock:
            h = self._handle()
            for i in range(q2.shape[0]):
                # enum ice_status ice_index_search(const struct ice_index *, const float * query, int32_t k,
                #     const struct ice_filter * filter, int64_t * labels, float * scores, int32_t * n_found);
                _check(lib.ice_index_search(h, ffi.cast("float *", q2[i].ctypes.data), k, filt,
                                            ffi.cast("int64_t *", labels[i].ctypes.data),
                                            ffi.cast("float *", scores[i].ctypes.data), n_found),
                       "ice_index_search")
        return (labels[0], scores[0]) if single else (labels, scores)

    def remove(self, id: int) -> None:
        with self._lock:
            # enum ice_status ice_index_remove(struct ice_index * index, int64_t id);
            _check(lib.ice_index_remove(self._handle(), int(id)), "ice_index_remove")

    def size(self) -> int:
        # int64_t ice_index_size(const struct ice_index * index);
        return int(lib.ice_index_size(self._handle()))

    __len__ = size

    def memory(self) -> int:
        # size_t ice_index_memory(const struct ice_index * index);
        return int(lib.ice_index_memory(self._handle()))

    def _free(self, ptr) -> None:
        # void ice_index_free(struct ice_index * index);
        lib.ice_index_free(ptr)


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class AttnParams:
    """Mirrors struct ice_attn_params (see iceformer.h for units and meaning)."""

    top_k: int
    n_sinks: int
    window: int
    block_size: int
    min_n_kv: int
    n_composite: int
    n_simple: int
    visit_budget: int
    retrieve_budget: int
    top_blocks: int
    min_blocks: int
    top_p: float
    block_share: float
    seed: int
    exact_search: bool
    tail_estimate: bool
    persistent: bool
    group_blocks: bool

    @classmethod
    def default(cls, **overrides) -> "AttnParams":
        # struct ice_attn_params ice_attn_default_params(void);
        c = lib.ice_attn_default_params()
        vals = {f.name: getattr(c, f.name) for f in dataclasses.fields(cls)}
        unknown = set(overrides) - set(vals)
        if unknown:
            raise TypeError(f"unknown AttnParams fields: {sorted(unknown)}")
        vals.update(overrides)
        return cls(**vals)

    def _to_c(self):
        p = ffi.new("struct ice_attn_params *")
        for f in dataclasses.fields(self):
            setattr(p, f.name, getattr(self, f.name))
        return p


def _view(arr: np.ndarray, ndim: int, name: str, dtypes) -> tuple:
    if arr.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {arr.dtype}")
    if arr.ndim == ndim - 1:
        arr = arr[None]
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} or {ndim - 1} dimensions, got shape {arr.shape}")
    if any(s <= 0 for s, n in zip(arr.strides, arr.shape) if n > 1):
        arr = np.ascontiguousarray(arr)
    v = ffi.new("struct ice_view *")
    v.data = ffi.cast("void *", arr.ctypes.data)
    v.type = _TYPES[arr.dtype]
    shape = list(arr.shape)[::-1] + [1] * (4 - ndim)
    strides = [abs(x) for x in arr.strides][::-1]
    strides += [strides[-1] * shape[ndim - 1]] * (4 - ndim)
    for i in range(4):
        v.ne[i] = shape[i]
        v.nb[i] = strides[i]
    return v, arr


class AttentionScratch(_Owned):
    """An ice_attn_scratch: per-thread working memory that the states of several layers can share
    (they must not run at the same time). Closed only once no open state borrows it."""

    _what = "attention scratch"

    def __init__(self):
        out = ffi.new("struct ice_attn_scratch **")
        # enum ice_status ice_attn_scratch_init(struct ice_attn_scratch ** out);
        _check(lib.ice_attn_scratch_init(out), "ice_attn_scratch_init")
        self._ptr = out[0]
        self._borrowers = 0

    def memory(self) -> int:
        # size_t ice_attn_scratch_memory(const struct ice_attn_scratch * scratch);
        return int(lib.ice_attn_scratch_memory(self._handle()))

    def close(self) -> None:
        if getattr(self, "_borrowers", 0):
            raise ValueError(f"the attention scratch is still used by {self._borrowers} open state(s)")
        super().close()

    def _free(self, ptr) -> None:
        # void ice_attn_scratch_free(struct ice_attn_scratch * scratch);
        lib.ice_attn_scratch_free(ptr)


class AttentionState(_Owned):
    """One layer's ice_attn_state (indices, summaries, and scratch of its own or a shared
    AttentionScratch), reusable across calls."""

    def __init__(self, params: AttnParams | None = None, scratch: AttentionScratch | None = None):
        self.params = params or AttnParams.default()
        self._scratch = None
        out = ffi.new("struct ice_attn_state **")
        # enum ice_status ice_attn_state_init_shared(const struct ice_attn_params *, struct ice_attn_scratch *,
        #                                            struct ice_attn_state ** out);
        c_scratch = scratch._handle() if scratch is not None else ffi.NULL
        _check(lib.ice_attn_state_init_shared(self.params._to_c(), c_scratch, out), "ice_attn_state_init_shared")
        self._ptr = out[0]
        if scratch is not None:
            self._scratch = scratch   # kept alive (and open) while this state is
            scratch._borrowers += 1

    def set_params(self, params: AttnParams) -> None:
        # enum ice_status ice_attn_state_set_params(struct ice_attn_state *, const struct ice_attn_params *);
        _check(lib.ice_attn_state_set_params(self._handle(), params._to_c()), "ice_attn_state_set_params")
        self.params = params

    _what = "attention state"

    def memory(self) -> int:
        # size_t ice_attn_state_memory(const struct ice_attn_state * state);
        return int(lib.ice_attn_state_memory(self._handle()))

    def counts(self) -> dict:
        """Rows answered, keys attended and keys visible over every forward call so far."""
        out = ffi.new("struct ice_attn_counts *")
        # enum ice_status ice_attn_state_counts(const struct ice_attn_state *, struct ice_attn_counts * out);
        _check(lib.ice_attn_state_counts(self._handle(), out), "ice_attn_state_counts")
        return {"n_rows": out.n_rows, "n_attended": out.n_attended, "n_visible": out.n_visible}

    def _free(self, ptr) -> None:
        # void ice_attn_state_free(struct ice_attn_state * state);
        lib.ice_attn_state_free(ptr)
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            scratch._borrowers -= 1


def _run_threads(fn, n_threads: int, concurrent: bool, what: str) -> None:
    if not concurrent or n_threads == 1:
        for ith in range(n_threads):
            _check(fn(ith), what)
        return
    results = [None] * n_threads

    def work(ith):
        results[ith] = fn(ith)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for r in results:
        _check(r, what)


@dataclasses.dataclass(frozen=True)
class CacheWrite:
    """What one evaluation tells a persistent state (struct ice_attn_io's persistence fields):
    the cells it writes (llama.cpp's k_idxs form: stream * stream_cells + cell), the cache size per
    stream, and the cache versions before and after (epoch_after 0: rebuild, keep nothing)."""

    written: tuple[int, ...]
    stream_cells: int
    epoch_before: int
    epoch_after: int


def attention(q, k, v, mask, scale: float, params: AttnParams | None = None, *, mode: str = "iceformer",
              n_threads: int = 1, v_transposed: bool = False, state: AttentionState | None = None,
              concurrent: bool = False, write: CacheWrite | None = None) -> np.ndarray:
    """Runs ice_attn_prepare + ice_attn_forward (mode="iceformer") or ice_attn_dense
    (mode="dense") for ith in range(n_threads) and returns out (see the module docstring).
    n_threads > 1 calls the threads one after another unless concurrent=True (real threads).
    write: persistence information for `state` (k and v must then be views of one buffer that
    stays in place across calls, as llama.cpp's cache does)."""
    if mode not in ("iceformer", "dense"):
        raise ValueError(f"mode must be 'iceformer' or 'dense', not {mode!r}")
    n_threads = int(n_threads)
    if n_threads < 1:
        raise ValueError("n_threads must be >= 1")
    q = np.asarray(q)
    k = np.asarray(k)
    v = np.asarray(v)
    mask = np.asarray(mask)
    squeeze = q.ndim == 3
    f32 = (np.dtype(np.float32),)
    kv_types = tuple(_TYPES)
    qv, q = _view(q, 4, "q", f32)
    kv, k = _view(k, 4, "k", kv_types)
    if v_transposed:
        v = v.swapaxes(-1, -2)      # (.., n_kv, d_v) view of the transposed buffer: strides swap
    vv, v = _view(v, 4, "v", kv_types)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask must have shape (n_stream or 1, n_rows, n_kv) or (n_rows, n_kv), got {mask.shape}")
    mask = np.ascontiguousarray(mask[:, None])     # (s, 1, rows, n_kv) -> ne = [n_kv, rows, 1, s]
    mv, mask = _view(mask, 4, "mask", kv_types)
    n_stream, n_head, n_tok, _ = q.shape
    d_v = v.shape[-1]
    out = np.zeros((n_stream, n_tok, n_head, d_v), dtype=np.float32)
    ov, out = _view(out, 4, "out", f32)
    io = ffi.new("struct ice_attn_io *")
    io.q, io.k, io.v, io.mask, io.out = qv[0], kv[0], vv[0], mv[0], ov[0]
    io.scale = float(scale)
    written = None
    if write is not None:
        written = ffi.new("int64_t[]", list(write.written) or [0])
        io.written, io.n_written = written, len(write.written)
        io.stream_cells, io.epoch_before, io.epoch_after = write.stream_cells, write.epoch_before, write.epoch_after
    keep = (q, k, v, mask, out, written)  # noqa: F841 - alive for the calls
    if mode == "dense":
        _run_threads(lambda ith: lib.ice_attn_dense(io, ith, n_threads), n_threads, concurrent, "ice_attn_dense")
    else:
        own = state is None
        st = AttentionState(params) if own else state
        if not own and params is not None:
            st.set_params(params)
        try:
            h = st._handle()
            _run_threads(lambda ith: lib.ice_attn_prepare(h, io, ith, n_threads), n_threads, concurrent, "ice_attn_prepare")
            _run_threads(lambda ith: lib.ice_attn_forward(h, io, ith, n_threads), n_threads, concurrent, "ice_attn_forward")
        finally:
            if own:
                st.close()
    return out[0] if squeeze else out
