"""ctypes bindings of the patched llama.h IceFormer API (patches/0001), mirroring the header."""

from __future__ import annotations

import ctypes

from ..errors import BackendError, UsageError
from .settings import IceformerSettings

LLAMA_ATTN_MODE_DENSE = 0
LLAMA_ATTN_MODE_ICEFORMER = 1
MAX_LAYERS = 256  # LLAMA_ICEFORMER_MAX_LAYERS
MODES = {"dense": LLAMA_ATTN_MODE_DENSE, "iceformer": LLAMA_ATTN_MODE_ICEFORMER}


class llama_iceformer_params(ctypes.Structure):
    # struct llama_iceformer_params { enum llama_attn_mode mode; int32_t top_k; ... bool dense_prefill;
    #                                 uint16_t layer_budget[LLAMA_ICEFORMER_MAX_LAYERS]; };
    _fields_ = [
        ("mode", ctypes.c_int),
        ("top_k", ctypes.c_int32),
        ("n_sinks", ctypes.c_int32),
        ("window", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("min_n_kv", ctypes.c_int32),
        ("n_composite", ctypes.c_int32),
        ("n_simple", ctypes.c_int32),
        ("visit_budget", ctypes.c_int32),
        ("retrieve_budget", ctypes.c_int32),
        ("top_blocks", ctypes.c_int32),
        ("min_blocks", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("block_share", ctypes.c_float),
        ("seed", ctypes.c_uint64),
        ("dense_layers", ctypes.c_uint64 * 4),
        ("exact_search", ctypes.c_bool),
        ("tail_estimate", ctypes.c_bool),
        ("persistent", ctypes.c_bool),
        ("group_blocks", ctypes.c_bool),
        ("dense_prefill", ctypes.c_bool),
        ("layer_budget", ctypes.c_uint16 * MAX_LAYERS),
    ]


class IceformerAPI:
    """The four functions, looked up in a loaded libllama (absent from stock builds)."""

    def __init__(self, lib: ctypes.CDLL):
        try:
            # struct llama_iceformer_params llama_iceformer_default_params(void);
            self._default = lib.llama_iceformer_default_params
            # int32_t llama_set_iceformer_params(struct llama_context *, const struct llama_iceformer_params *);
            self._set = lib.llama_set_iceformer_params
            # struct llama_iceformer_params llama_get_iceformer_params(const struct llama_context *);
            self._get = lib.llama_get_iceformer_params
            # size_t llama_iceformer_memory(const struct llama_context *);
            self._memory = lib.llama_iceformer_memory
            # int32_t llama_iceformer_counts(const struct llama_context *, int32_t il, int64_t * n_rows,
            #                                int64_t * n_attended, int64_t * n_visible);
            self._counts = lib.llama_iceformer_counts
        except AttributeError:
            raise BackendError("this libllama has no IceFormer API (a stock build?); "
                               "iceformer attention needs the patched backend") from None
        self._default.argtypes, self._default.restype = [], llama_iceformer_params
        self._set.argtypes = [ctypes.c_void_p, ctypes.POINTER(llama_iceformer_params)]
        self._set.restype = ctypes.c_int32
        self._get.argtypes, self._get.restype = [ctypes.c_void_p], llama_iceformer_params
        self._memory.argtypes, self._memory.restype = [ctypes.c_void_p], ctypes.c_size_t
        i64p = ctypes.POINTER(ctypes.c_int64)
        self._counts.argtypes = [ctypes.c_void_p, ctypes.c_int32, i64p, i64p, i64p]
        self._counts.restype = ctypes.c_int32

    def default_params(self) -> llama_iceformer_params:
        return self._default()

    def to_params(self, mode: str, settings: IceformerSettings | None) -> llama_iceformer_params:
        if mode not in MODES:
            raise UsageError(f"unknown attention {mode!r}: choose dense or iceformer")
        p = self._default()
        p.mode = MODES[mode]
        for name, value in (settings or IceformerSettings()).kernel_overrides().items():
            if name == "dense_layers":
                words = [0, 0, 0, 0]
                for layer in value:
                    words[layer // 64] |= 1 << (layer % 64)
                for i in range(4):
                    p.dense_layers[i] = words[i]
            elif name == "layer_budget":
                for layer, percent in enumerate(value):   # layers past the list keep the default (100)
                    p.layer_budget[layer] = percent
            else:
                setattr(p, name, value)
        return p

    def set(self, ctx, mode: str, settings: IceformerSettings | None) -> None:
        p = self.to_params(mode, settings)
        if self._set(ctx, ctypes.byref(p)) != 0:
            raise UsageError(f"the kernel rejected the IceFormer settings {settings.overrides() if settings else {}}")

    def get(self, ctx, n_layer: int = MAX_LAYERS) -> dict:
        """The context's settings; dense_layers and layer_budget cover layers 0..n_layer-1 (the model's layers:
        the struct holds MAX_LAYERS entries whatever the model)."""
        n_layer = min(n_layer, MAX_LAYERS)
        p = self._get(ctx)
        out = {f[0]: getattr(p, f[0]) for f in llama_iceformer_params._fields_
               if f[0] not in ("dense_layers", "layer_budget")}
        out["mode"] = {v: k for k, v in MODES.items()}[out["mode"]]
        for name in ("top_p", "block_share"):
            out[name] = round(out[name], 6)   # a C float: 0.95 reads back as 0.949999988
        out["dense_layers"] = [i for i in range(n_layer) if (p.dense_layers[i // 64] >> (i % 64)) & 1]
        out["layer_budget"] = list(p.layer_budget[:n_layer])
        return out

    def memory(self, ctx) -> int:
        return int(self._memory(ctx))

    def counts(self, ctx, layer: int = -1) -> dict:
        """What the kernel attended since the context was made, in `layer` (-1: all layers)."""
        rows, attended, visible = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
        if self._counts(ctx, layer, ctypes.byref(rows), ctypes.byref(attended), ctypes.byref(visible)) != 0:
            raise UsageError(f"no layer {layer} in the IceFormer counts")
        return {"n_rows": rows.value, "n_attended": attended.value, "n_visible": visible.value}

