"""ggml's CPU backend as run-time-chosen modules: what a portable build ships and how it is loaded.

A portable build compiles ggml's CPU backend once per ISA level (libggml-cpu-x64.so, -sse42, -haswell,
-zen4, ...). ggml registers them only when asked: libllama's own fallback (llama_backend_init calling
ggml_backend_load_all) searches the executable's folder and the working directory, never the
library's, and llama-cpp-python asks nothing. So whoever loads a portable libllama registers the
modules of its folder first; ggml scores each against the CPU and keeps the best.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def cpu_modules(lib_dir: Path) -> list[Path]:
    """The CPU backend modules in lib_dir (empty for a native build, whose CPU backend is linked in)."""
    return sorted(Path(lib_dir).glob("libggml-cpu-*.so"))


def load_cpu_modules(lib_dir: Path) -> int:
    """Registers lib_dir's CPU modules with the libggml that libllama in lib_dir uses; returns the number
    of registered backends. Call after libllama is loaded and before the first model loads."""
    lib_dir = Path(lib_dir)
    # The same file libllama's RUNPATH ($ORIGIN) resolved, so dlopen returns the loaded copy.
    name = next((n for n in ("libggml.so.0", "libggml.so") if (lib_dir / n).exists()), "libggml.so")
    ggml = ctypes.CDLL(str(lib_dir / name))
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path.restype = None
    ggml.ggml_backend_reg_count.argtypes = []
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_reg_count() == 0:
        ggml.ggml_backend_load_all_from_path(os.fsencode(lib_dir))
    return int(ggml.ggml_backend_reg_count())
