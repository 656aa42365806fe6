"""Chooses which llama.cpp libraries llama-cpp-python loads: one backend per process.

llama-cpp-python loads libllama from $LLAMA_CPP_LIB_PATH when `llama_cpp` is first imported,
so the choice must be made before that import and cannot change afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys

from ..building.build import KINDS, find_build
from ..building.ggml_modules import cpu_modules, load_cpu_modules
from ..errors import BackendError

ENV_VAR = "ICEFORMER_LLAMA_BACKEND"
DEFAULT = "patched"
# "portable" or "native" picks that variant of the build; unset: this machine's build when there is one.
BUILD_ENV_VAR = "ICEFORMER_LLAMA_BUILD"

_chosen: str | None = None
_loaded: tuple[str, str] | None = None  # (backend, lib dir) once llama_cpp is imported by us
_api = None


def use_backend(name: str) -> None:
    """Selects 'patched' or 'stock' for this process; call before the first model loads."""
    global _chosen
    if name not in KINDS:
        raise BackendError(f"unknown backend {name!r}: choose patched or stock")
    if _loaded is not None and _loaded[0] != name:
        raise BackendError(f"the {_loaded[0]} backend is already loaded in this process; "
                           f"start a new process to use {name}")
    _chosen = name


def selected() -> str:
    name = _chosen or os.environ.get(ENV_VAR) or DEFAULT
    if name not in KINDS:
        raise BackendError(f"{ENV_VAR}={name!r} is not a backend: choose patched or stock")
    return name


def load():
    """Imports llama_cpp bound to the selected backend's libraries and returns the module."""
    global _loaded
    name = selected()
    if _loaded is not None:
        if _loaded[0] != name:
            raise BackendError(f"the {_loaded[0]} backend is already loaded in this process; "
                               f"start a new process to use {name}")
        return sys.modules["llama_cpp"]
    variant = os.environ.get(BUILD_ENV_VAR) or None
    if variant not in (None, "native", "portable"):
        raise BackendError(f"{BUILD_ENV_VAR}={variant!r}: choose native or portable")
    info = find_build(name, portable=None if variant is None else variant == "portable")
    if info is None:
        flag = (" --stock" if name == "stock" else "") + (" --portable" if variant == "portable" else "")
        what = f"{variant} {name}" if variant else name
        raise BackendError(f"the {what} llama.cpp is not built; run: python -m iceformer_llama build{flag}")
    if not info.current:
        print(f"warning: using the last good {name} build; sources changed since "
              f"(run: python -m iceformer_llama build{' --stock' if name == 'stock' else ''})", file=sys.stderr)
    lib_dir = str(info.lib_dir)
    if "llama_cpp" in sys.modules:
        # Imported by someone else: fine only if it loaded exactly our libraries.
        if os.environ.get("LLAMA_CPP_LIB_PATH") != lib_dir:
            raise BackendError("llama_cpp was imported before iceformer_llama chose a backend, with other "
                               "libraries; import iceformer_llama and call use_backend() first")
    os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir
    try:
        import llama_cpp
    except ImportError as e:
        raise BackendError(f"llama-cpp-python is not installed ({e}); run: python -m iceformer_llama setup") from None
    except (OSError, RuntimeError) as e:
        raise BackendError(f"cannot load {info.libllama}: {e}") from None
    if cpu_modules(info.lib_dir):
        # ggml names the module it chose on stderr, unconditionally (level NONE): not for users
        with quiet_stderr():
            registered = load_cpu_modules(info.lib_dir)
        if registered == 0:
            raise BackendError(f"no CPU backend module in {info.lib_dir} runs on this CPU")
    llama_cpp.llama_backend_init()
    _loaded = (name, lib_dir)
    return llama_cpp


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 to /dev/null (native code writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def loaded() -> str | None:
    """The backend loaded in this process, or None."""
    return _loaded[0] if _loaded else None


def iceformer_api():
    """The patched library's IceFormer API (BackendError on the stock backend)."""
    global _api
    llama_cpp = load()
    if _api is None:
        from .ice_ctypes import IceformerAPI
        _api = IceformerAPI(llama_cpp.llama_cpp._lib)
    return _api
