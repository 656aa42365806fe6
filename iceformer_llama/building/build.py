"""Builds the patched (and the stock) llama.cpp shared libraries into a content-keyed cache.

Layout under cache_dir():
  downloads/                 the verified sdist
  work/<kind>/src            pinned llama.cpp (+ patches for kind "patched"), swapped in whole
  work/<kind>/build          cmake/ninja build dir, kept so edits to native/ or patches rebuild incrementally
  builds/<kind>-<key>/       finished libraries + build.json; created by rename, never half-written
  builds/<kind>.last-good    name of the newest build of that kind that passed its smoke test
A portable build (`--portable`) uses work/<kind>-portable/ and builds/<kind>-portable.last-good.
A wheel made by `wheelhouse` ships portable libraries in the package instead (iceformer_llama/_libs/<kind>/).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import _pins
from ..errors import BuildError
from ..paths import SOURCE_ROOT, cache_dir, cache_lock
from .ggml_modules import cpu_modules
from .source import PATCH_DIR, patch_paths, prepare_tree

KINDS = ("patched", "stock")
# (module, pip requirement) of the tools a build needs; `setup` installs the missing ones (pyproject's [build]).
BUILD_TOOLS = (("cmake", "cmake>=3.24"), ("ninja", "ninja>=1.11"), ("scikit_build_core", "scikit-build-core>=0.9"))
NATIVE_DIR = SOURCE_ROOT / "native"
LIB_GLOBS = ("libllama.so*", "libggml*.so*", "libllama.dylib", "libggml*.dylib")
_TARGETS = ("llama", "ggml")

# AMX tile instructions crash ggml's AMX matmul on the Xeons we build on; never emit them.
_NO_AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
# A portable build's CPU module compiled with AMX: it would be chosen on AMX Xeons, so it is not installed.
_PORTABLE_SKIPPED = ("libggml-cpu-sapphirerapids.so",)
# Libraries shipped inside a wheel (see wheelhouse.py).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "_libs"


@dataclass(frozen=True)
class BuildInfo:
    kind: str
    key: str
    path: Path          # builds/<kind>-<key>
    lib_dir: Path       # where libllama lives
    current: bool       # built from today's pins, patches, native sources and flags
    portable: bool = False  # ggml's CPU backend as run-time-chosen modules (libggml-cpu-<isa>.so)

    @property
    def libllama(self) -> Path:
        return self.lib_dir / ("libllama.dylib" if sys.platform == "darwin" else "libllama.so")

    def manifest(self) -> dict:
        return json.loads((self.path / "build.json").read_text())


def native_cpu_macros(cc: str = "cc") -> set[str]:
    """The ISA macros the compiler enables for -march=native on this machine."""
    try:
        out = subprocess.run([cc, "-march=native", "-dM", "-E", "-x", "c", os.devnull],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(re.findall(r"#define (__[A-Z0-9_]+__) 1", out))


def cpu_flags(macros: set[str] | None = None) -> dict:
    """CMake settings for this machine: native ISA, minus AMX when the CPU reports it."""
    macros = native_cpu_macros() if macros is None else macros
    has_amx = any(m.startswith("__AMX") for m in macros)
    extra = " ".join(_NO_AMX) if has_amx else ""
    return {
        "GGML_NATIVE": "ON",
        "GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF", "GGML_AMX_BF16": "OFF",
        "CMAKE_C_FLAGS": extra,
        "CMAKE_CXX_FLAGS": extra,
        "cpu_has_amx": has_amx,
    }


def portable_flags(machine: str | None = None, cc: str = "cc") -> dict:
    """CMake settings of a build that runs on any x86-64 with SSE4.2 (or any aarch64): ggml's CPU backend
    compiled once per ISA level as modules, the best one chosen at run time, as llama.cpp's release builds
    do. The kernel in libllama picks its SIMD at run time already (native/src/simd.c).

    On aarch64 two of ggml's variants need -march=armv9.2-a+sme, which GCC before 14 rejects (the build
    would fail); with such a compiler the portable build is one CPU backend for baseline armv8-a instead."""
    machine = machine or platform.machine()
    if machine in ("aarch64", "arm64") and not compiler_accepts(cc, "-march=armv9.2-a+sme"):
        return {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "OFF", "GGML_CPU_ARM_ARCH": "armv8-a", "portable": True}
    return {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "ON", "GGML_CPU_ALL_VARIANTS": "ON", "portable": True}


def compiler_accepts(cc: str, flag: str) -> bool:
    try:
        return subprocess.run([cc, flag, "-x", "c", "-c", "-o", os.devnull, os.devnull],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_flags(portable: bool) -> dict:
    return portable_flags() if portable else cpu_flags()


def cmake_defines(flags: dict, *, patched: bool) -> list[str]:
    defines = {
        "CMAKE_BUILD_TYPE": "Release",
        "BUILD_SHARED_LIBS": "ON",
        "LLAMA_BUILD_COMMON": "OFF", "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_TOOLS": "OFF",
        "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_SERVER": "OFF", "LLAMA_BUILD_APP": "OFF",
        "LLAMA_CURL": "OFF", "LLAMA_OPENSSL": "OFF", "GGML_BACKEND_DL": "OFF",
        "CMAKE_INSTALL_RPATH": "$ORIGIN", "CMAKE_BUILD_WITH_INSTALL_RPATH": "ON",
    }
    defines.update({k: v for k, v in flags.items() if k.isupper()})
    if patched:
        defines["LLAMA_ICEFORMER_DIR"] = str(NATIVE_DIR)
    return [f"-D{k}={v}" for k, v in sorted(defines.items())]


def _hash_files(digest, files) -> None:
    for f in files:
        digest.update(str(f.name).encode() + b"\0" + f.read_bytes() + b"\0")


def source_key(kind: str) -> str:
    """Identifies the source tree: pins, and for patched the patch series."""
    d = hashlib.sha256(f"{kind}\0{_pins.LLAMA_CPP_PYTHON_SHA256}\0".encode())
    if kind == "patched":
        _hash_files(d, patch_paths())
    return d.hexdigest()[:12]


def native_sources() -> list[Path]:
    return sorted(p for p in NATIVE_DIR.rglob("*") if p.is_file() and p.suffix in (".c", ".h"))


def build_key(kind: str, flags: dict) -> str:
    """Identifies a finished build: source key, native sources (patched), flags."""
    d = hashlib.sha256(source_key(kind).encode())
    if kind == "patched":
        _hash_files(d, native_sources())
    d.update(json.dumps(flags, sort_keys=True).encode())
    return d.hexdigest()[:16]


def builds_dir() -> Path:
    return cache_dir() / "builds"


def _variant(kind: str, portable: bool) -> str:
    return f"{kind}-portable" if portable else kind


def _last_good_file(kind: str, portable: bool = False) -> Path:
    return builds_dir() / f"{_variant(kind, portable)}.last-good"


def _info(kind: str, name: str, current: bool, portable: bool = False) -> BuildInfo:
    path = builds_dir() / name
    return BuildInfo(kind=kind, key=name.rsplit("-", 1)[1], path=path, lib_dir=path / "lib", current=current,
                     portable=portable)


def _shipped(kind: str) -> BuildInfo | None:
    path = SHIPPED_DIR / kind
    if not (path / "build.json").exists():
        return None
    key = json.loads((path / "build.json").read_text())["key"]
    return BuildInfo(kind=kind, key=key, path=path, lib_dir=path, current=True, portable=True)


def _have_sources() -> bool:
    """A source checkout (native/, patches/): builds can be keyed and made. A wheel install has none."""
    return (NATIVE_DIR / "include" / "iceformer.h").is_file() and PATCH_DIR.is_dir()


def find_build(kind: str, *, flags: dict | None = None, portable: bool | None = None) -> BuildInfo | None:
    """The libraries to load for `kind`, best first: the build of today's sources for this machine, the
    portable build of today's sources, libraries shipped in the package (a wheel), then the last good
    build (current=False); None when there is none. `portable` True/False looks at that variant only."""
    if kind not in KINDS:
        raise BuildError(f"unknown build kind {kind!r}: choose {' or '.join(KINDS)}")
    variants = (False, True) if portable is None else (portable,)
    if _have_sources():
        for p in variants:
            f = flags if (flags is not None and not p) else build_flags(p)
            name = f"{_variant(kind, p)}-{build_key(kind, f)}"
            if (builds_dir() / name / "build.json").exists():
                return _info(kind, name, True, p)
    if portable is not False and (shipped := _shipped(kind)) is not None:
        return shipped
    for p in variants:
        last = _last_good_file(kind, p)
        if last.exists():
            name = last.read_text().strip()
            if (builds_dir() / name / "build.json").exists():
                return _info(kind, name, False, p)
    return None


class _Progress:
    """Turns ninja's "[N/M] ..." lines into a progress bar on a TTY; silent otherwise."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.bar = label, enabled, None

    def line(self, text: str) -> None:
        m = re.match(r"\[(\d+)/(\d+)\]", text)
        if not (m and self.enabled):
            return
        done, total = int(m.group(1)), int(m.group(2))
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=self.label, unit="step", file=sys.stderr, leave=False)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_logged(cmd: list[str], log: Path, progress: _Progress | None = None, cwd: Path | None = None) -> None:
    with open(log, "a") as logf:
        logf.write("$ " + " ".join(cmd) + "\n")
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                logf.write(line)
                if progress:
                    progress.line(line)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if progress:
                progress.close()
    if rc != 0:
        raise BuildError(f"{Path(cmd[0]).name} failed (exit {rc}); see the log: {log}")


def _tool(name: str) -> str:
    """cmake/ninja: prefer the ones pip installed next to this Python, then PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise BuildError(f"{name} not found: install it with 'python -m pip install {name}'")
    return found


def _current_tree(work: Path, kind: str) -> Path:
    """work/src holding today's source; replaced whole when pins or patches change.

    Unpacked files keep the sdist's timestamps, so the persistent build dir beside it
    recompiles only what a new patch touched.
    """
    tree, stamp_name, key = work / "src", ".iceformer-source-key", source_key(kind)
    stamp = tree / stamp_name
    if stamp.exists() and stamp.read_text() == key:
        return tree
    fresh = prepare_tree(work / f".src-{key}", patched=(kind == "patched"))
    (fresh / stamp_name).write_text(key)
    if tree.exists():
        old = work / f".src-old-{os.getpid()}"
        os.replace(tree, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(fresh, tree)
    return tree


def smoke_test(lib_dir: Path, model: Path | None, timeout: float = 300) -> str:
    """Loads the library in a child process and, given a model, decodes a prompt and 2 tokens; returns
    llama.cpp's system info line from that process.

    A child so that a crashing library (an illegal instruction, the AMX segfault) fails the
    build instead of the caller.
    """
    cmd = [sys.executable, "-m", "iceformer_llama.building.smoke", str(lib_dir)] + ([str(model)] if model else [])
    env = dict(os.environ, PYTHONPATH=str(SOURCE_ROOT))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BuildError(f"the built library hung in its smoke test ({timeout:.0f} s); not installed") from None
    if proc.returncode != 0:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        raise BuildError(f"the built library failed its smoke test ({why}) {last}; not installed, "
                         "the last good build stays in use")
    return (proc.stdout.strip().splitlines() or [""])[-1]


def build(kind: str = "patched", *, jobs: int | None = None, progress: bool | None = None,
          smoke_model: Path | None = None, force: bool = False, portable: bool = False, log=print) -> BuildInfo:
    """Builds `kind` unless an identical build exists; returns it."""
    if kind not in KINDS:
        raise BuildError(f"unknown build kind {kind!r}: choose {' or '.join(KINDS)}")
    if jobs is not None and jobs < 1:
        raise BuildError(f"-j must be at least 1, got {jobs}")
    if not _have_sources():
        raise BuildError(f"no source checkout here ({NATIVE_DIR} is missing): this install ships its libraries; "
                         "to build, clone the project")
    flags = build_flags(portable)
    key = build_key(kind, flags)
    variant = _variant(kind, portable)
    name = f"{variant}-{key}"
    final = builds_dir() / name
    started_waiting = time.time()
    if (final / "build.json").exists() and not force:
        _last_good_file(kind, portable).write_text(name)
        return _info(kind, name, True, portable)
    if not python_layer_installed():
        # Without it the smoke test cannot load the library: say so before compiling, not after.
        raise BuildError(f"llama-cpp-python's Python layer is not installed in this Python ({sys.executable}); "
                         "run: python -m iceformer_llama setup")
    label = f"{kind}{' portable' if portable else ''} llama.cpp"
    with cache_lock(f"build-{variant}", waiting_for=f"to finish building {label}", log=log):
        if (final / "build.json").exists() and (not force or _built_since(final, started_waiting)):
            _last_good_file(kind, portable).write_text(name)  # the other process built it while we waited
            return _info(kind, name, True, portable)
        return _build_locked(kind, flags, key, portable=portable, jobs=jobs, progress=progress,
                             smoke_model=smoke_model, log=log)


def python_layer_installed() -> bool:
    """llama-cpp-python's Python layer, which loads our libraries, is importable (found, not imported:
    importing it loads a libllama)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _built_since(final: Path, t: float) -> bool:
    return (final / "build.json").stat().st_mtime >= t


def _build_locked(kind: str, flags: dict, key: str, *, portable: bool, jobs, progress, smoke_model,
                  log) -> BuildInfo:
    variant = _variant(kind, portable)
    name = f"{variant}-{key}"
    final = builds_dir() / name
    progress = sys.stderr.isatty() if progress is None else progress
    started = time.monotonic()
    work = cache_dir() / "work" / variant  # its own build dir: no CPU libraries of the other variant
    tree = _current_tree(work, kind)
    build_dir = work / "build"
    build_dir.mkdir(parents=True, exist_ok=True)
    log_file = work / "build.log"
    log_file.write_text("")
    log(f"building {kind}{' portable' if portable else ''} llama.cpp {_pins.LLAMA_CPP_COMMIT} (log: {log_file})")

    _run_logged([_tool("cmake"), "-S", str(tree), "-B", str(build_dir), "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}", *cmake_defines(flags, patched=(kind == "patched"))],
                log_file)
    ninja = [_tool("ninja"), "-C", str(build_dir), *(["-j", str(jobs)] if jobs else []), *_TARGETS]
    _run_logged(ninja, log_file, _Progress(f"{kind}", progress))

    builds_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=builds_dir(), prefix=f".{name}-"))
    try:
        lib_dir = tmp / "lib"
        lib_dir.mkdir()
        for pattern in LIB_GLOBS:
            for f in (build_dir / "bin").glob(pattern):
                if f.name not in _PORTABLE_SKIPPED:
                    shutil.copy2(f, lib_dir / f.name, follow_symlinks=False)  # keep soname links as links
        if not (lib_dir / "libllama.so").exists() and not (lib_dir / "libllama.dylib").exists():
            raise BuildError(f"the build produced no libllama in {build_dir / 'bin'}")
        if flags.get("GGML_CPU_ALL_VARIANTS") == "ON" and not cpu_modules(lib_dir):
            raise BuildError(f"the portable build produced no CPU backend modules in {build_dir / 'bin'}")
        system_info = smoke_test(lib_dir, smoke_model)
        manifest = {
            "kind": kind, "key": key, "llama_cpp_python": _pins.LLAMA_CPP_PYTHON_VERSION,
            "llama_cpp_commit": _pins.LLAMA_CPP_COMMIT, "patches": list(_pins.PATCHES) if kind == "patched" else [],
            "flags": flags, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.monotonic() - started, 1), "native_dir": str(NATIVE_DIR),
            "smoke_model": str(smoke_model) if smoke_model else None,
            "portable": portable, "cpu_modules": [f.name for f in cpu_modules(lib_dir)],
            "system_info": system_info,  # as the smoke test's process saw it (the CPU module chosen here)
        }
        (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _last_good_file(kind, portable).write_text(name)
    log(f"built {variant} in {time.monotonic() - started:.0f} s: {final / 'lib'}")
    return _info(kind, name, True, portable)


def describe() -> list[str]:
    """Lines for `build --info`: what is built, with which flags, and which libraries load."""
    flags = cpu_flags()
    portable = " ".join(f"{k}={v}" for k, v in portable_flags().items() if k.isupper())
    lines = [f"llama-cpp-python {_pins.LLAMA_CPP_PYTHON_VERSION} sdist (sha256 {_pins.LLAMA_CPP_PYTHON_SHA256[:16]}...),"
             f" llama.cpp {_pins.LLAMA_CPP_COMMIT}",
             f"patches: {', '.join(_pins.PATCHES)} (in {PATCH_DIR})",
             f"cache: {cache_dir()}",
             f"native builds: GGML_NATIVE=ON, AMX {'reported by this CPU and disabled' if flags['cpu_has_amx'] else 'off'}",
             f"portable builds: {portable} (CPU code chosen at run time; the AMX module left out)"]
    layer = python_layer_installed()
    if not layer:
        lines.append("llama-cpp-python: Python layer not installed (run: python -m iceformer_llama setup)")
    for kind in KINDS:
        for variant in (False, True) if _have_sources() else ():
            label = f"{kind} ({'portable' if variant else 'native'})"
            info = find_build(kind, portable=variant)
            if info is None or info.path.parent != builds_dir():
                cmd = "build" + (" --stock" if kind == "stock" else "") + (" --portable" if variant else "")
                if not layer:  # setup installs the Python layer and builds the native variant
                    cmd = f"setup{' --stock' if kind == 'stock' else ''}" + (f" first, then {cmd}" if variant else "")
                lines.append(f"{label}: not built (run: python -m iceformer_llama {cmd})")
                continue
            m = info.manifest()
            state = "up to date" if info.current else "outdated (sources changed since; last good build)"
            lines.append(f"{label}: {state}, built {m['built_at']} in {m['build_seconds']} s: {info.lib_dir}")
        if (shipped := _shipped(kind)) is not None:
            lines.append(f"{kind} (shipped in the package, portable): {shipped.lib_dir}")
        used = find_build(kind)
        if used is not None:
            info_line = used.manifest().get("system_info") or ""
            lines.append(f"{kind} in use: {used.lib_dir}" + (f" ({info_line})" if info_line else ""))
    return lines
