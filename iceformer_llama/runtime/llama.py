"""iceformer_llama.Llama: llama_cpp.Llama on the chosen backend, with IceFormer attention."""

from __future__ import annotations

import inspect
from pathlib import Path

from ..errors import BackendError, UsageError
from . import backend, calibration
from .settings import ATTENTION_MODES, IceformerSettings, default_attention

# Methods and properties forwarded unchanged to the wrapped llama_cpp.Llama.
_FORWARDED = (
    "tokenize", "detokenize", "reset", "eval", "sample", "generate", "create_completion",
    "create_chat_completion", "create_chat_completion_openai_v1", "create_embedding", "embed",
    "save_state", "load_state", "n_embd", "n_vocab", "token_bos", "token_eos", "tokenizer",
    "set_seed", "logits_to_logprobs",
)


class Llama:
    """A drop-in for llama_cpp.Llama: same constructor arguments and methods, plus

    - model_path: a GGUF path, a known alias, REPO_ID:FILENAME, or None for the bundled model;
    - attention: "dense" (upstream llama.cpp attention), "iceformer" (patched backend only), or None (the
      default): the backend's default, iceformer on the patched backend and dense on the stock one, as
      the CLI and the server do; "iceformer" on the stock backend is an error (BackendError);
    - iceformer: IceformerSettings (None: library defaults).

    Unknown keyword arguments raise TypeError instead of being swallowed.
    """

    def __init__(self, model_path: str | Path | None = None, *, attention: str | None = None,
                 iceformer: IceformerSettings | None = None, **llama_kwargs):
        from .models import check_gguf, resolve_model

        if attention is not None and attention not in ATTENTION_MODES:
            raise UsageError(f"unknown attention {attention!r}: choose dense or iceformer")
        if iceformer is not None and not isinstance(iceformer, IceformerSettings):
            raise TypeError("iceformer must be an IceformerSettings")
        llama_cpp = backend.load()
        accepted = _constructor_arguments(llama_cpp.Llama)
        unknown = sorted(set(llama_kwargs) - accepted)
        if unknown:
            raise TypeError(f"Llama() got unexpected keyword argument(s): {', '.join(unknown)}")
        if attention is None:
            attention = default_attention(backend.loaded())
        if attention == "iceformer" and backend.loaded() != "patched":
            raise BackendError("iceformer attention needs the patched backend (this process uses stock)")
        n_ctx = llama_kwargs.get("n_ctx", 512)
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise UsageError(f"context size must be a positive number of tokens, got {n_ctx!r}")

        path = resolve_model(None if model_path is None else str(model_path))
        self.model_info = check_gguf(path)
        self.model_path = str(path)
        llama_kwargs.setdefault("verbose", False)
        try:
            self._llm = llama_cpp.Llama(model_path=self.model_path, **llama_kwargs)
        except ValueError as e:
            raise UsageError(f"llama.cpp could not load {path}: {e}") from None
        self.backend = backend.loaded()
        # The model's calibration profile (calibration.py), which the speed levels then come from; None:
        # settings.SPEED_LEVELS. Set it to None to run the uncalibrated levels (calibrate does).
        self.profile = calibration.profile_for(path) if self.backend == "patched" else None
        self.attention = "dense"
        self.iceformer_settings = IceformerSettings()
        if self.backend == "patched" or attention != "dense":
            self.set_attention(attention, iceformer)

    def set_attention(self, attention: str, iceformer: IceformerSettings | None = None) -> None:
        """Switches attention between decode calls, without reloading the model.

        When the model has a calibration profile (`self.profile`), the speed level (the default one when
        none is set) takes its knobs from it instead of settings.SPEED_LEVELS; knobs set explicitly win."""
        settings = iceformer or IceformerSettings()
        if attention == "iceformer" and self.backend != "patched":
            raise BackendError("iceformer attention needs the patched backend")
        if self.backend == "patched":
            effective = settings if self.profile is None else self.profile.settings_for(settings)
            backend.iceformer_api().set(self._llm.ctx, attention, effective)
        self.attention, self.iceformer_settings = attention, settings

    def attention_params(self) -> dict:
        """The settings in force, as the library reports them (patched backend); the per-layer lists
        (dense_layers, layer_budget) cover the model's layers."""
        if self.backend != "patched":
            return {"mode": "dense"}
        return backend.iceformer_api().get(self._llm.ctx, self.n_layer())

    def n_layer(self) -> int:
        """The model's layer count, as llama.cpp loaded it."""
        return int(backend.load().llama_model_n_layer(self._llm.model))

    def attention_counts(self, layer: int = -1) -> dict:
        """What the IceFormer kernel attended since the model was loaded, in `layer` (-1: every layer):
        n_rows (query rows x heads answered), n_attended (keys attended exactly), n_visible (keys
        dense attention would read). n_attended / n_visible is a setting's cost in keys."""
        if self.backend != "patched":
            return {"n_rows": 0, "n_attended": 0, "n_visible": 0}
        return backend.iceformer_api().counts(self._llm.ctx, layer)

    def iceformer_memory(self) -> int:
        """Bytes held by the IceFormer kernel state of this context."""
        return backend.iceformer_api().memory(self._llm.ctx) if self.backend == "patched" else 0

    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache that sequence 0 fills now: llama.cpp's own count (the size of its saved
        state, the cells in use, not the cache allocated), what iceformer_memory() is measured against."""
        return int(backend.load().llama_state_seq_get_size(self._llm.ctx, 0))

    # -- the llama_cpp.Llama surface --------------------------------------------------------
    def n_ctx(self) -> int:
        """Usable context: llama.cpp may round its context up, llama_cpp's buffers keep the size asked for."""
        return min(self._llm.n_ctx(), len(self._llm.input_ids))

    def __call__(self, *args, **kwargs):
        return self._llm(*args, **kwargs)

    def __getattr__(self, name):
        if name in _FORWARDED or name in ("ctx", "model", "scores", "input_ids", "n_tokens", "metadata",
                                          "chat_format", "chat_handler", "verbose", "context_params",
                                          "model_params", "_scores", "eval_tokens", "eval_logits"):
            return getattr(self.__dict__["_llm"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def llama(self):
        """The wrapped llama_cpp.Llama."""
        return self._llm

    def close(self) -> None:
        llm = self.__dict__.pop("_llm", None)
        if llm is not None:
            llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _constructor_arguments(cls) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n not in ("self", "model_path") and p.kind != p.VAR_KEYWORD}
