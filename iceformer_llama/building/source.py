"""The pinned llama.cpp source: fetch through pip, verify, unpack, apply the patch series."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .. import _pins
from ..errors import BuildError
from ..paths import SOURCE_ROOT, cache_dir, cache_lock, sha256_of

PATCH_DIR = SOURCE_ROOT / "patches"

# Parts of the vendored tree a library-only build never reads (docs, vocab files, tools...).
_SKIPPED_TOP_DIRS = {"models", "docs", "tools", "examples", "tests", "benches", "media", "conversion", "gguf-py"}


def patch_paths() -> list[Path]:
    """The series in application order, as pinned in _pins.PATCHES."""
    return [PATCH_DIR / name for name in _pins.PATCHES]


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def fetch_sdist(*, expected_sha256: str = _pins.LLAMA_CPP_PYTHON_SHA256) -> Path:
    """Returns the verified sdist, downloading it through pip when it is not cached.

    A file whose sha256 differs is deleted before the error is raised, so nothing
    unverified is ever unpacked or kept.
    """
    target = downloads_dir() / _pins.LLAMA_CPP_PYTHON_SDIST
    if not target.exists():
        with cache_lock("sdist", waiting_for="to finish downloading the llama.cpp source"):
            if not target.exists():
                _download_sdist(target)
    actual = sha256_of(target)
    if actual != expected_sha256:
        target.unlink()
        raise BuildError(f"sha256 mismatch for {target.name}: expected {expected_sha256}, got {actual}; "
                         "the file was deleted and nothing was unpacked")
    return target


def _download_sdist(target: Path) -> None:
    """pip download of the sdist into target; pip's progress bar shows on a terminal."""
    print(f"downloading llama-cpp-python {_pins.LLAMA_CPP_PYTHON_VERSION} source (llama.cpp {_pins.LLAMA_CPP_COMMIT}, "
          "77 MB) with pip", file=sys.stderr, flush=True)
    show = sys.stderr.isatty()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as tmp:
        # --no-build-isolation: pip must only read metadata, not build cmake from source.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               "--no-binary", "llama-cpp-python", "--disable-pip-version-check", *([] if show else ["-q"]),
               f"llama-cpp-python=={_pins.LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
        # On a terminal pip writes to our stderr (stdout stays clean); otherwise its output is kept for the error.
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=2 if show else subprocess.PIPE,
                              stderr=None if show else subprocess.PIPE, text=True)
        got = Path(tmp) / _pins.LLAMA_CPP_PYTHON_SDIST
        if proc.returncode != 0 or not got.exists():
            last = ((proc.stderr or "").strip().splitlines() or ["see pip's output above" if show else "no output"])[-1]
            raise BuildError(f"could not download llama-cpp-python {_pins.LLAMA_CPP_PYTHON_VERSION} "
                             f"source with pip ({last}); check the network or the package index")
        os.replace(got, target)


def _extract_llama_cpp(sdist: Path, dest: Path) -> None:
    prefix = _pins.LLAMA_CPP_SUBDIR + "/"
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix):]
            if not rel or rel.split("/", 1)[0] in _SKIPPED_TOP_DIRS or rel == ".git":
                continue
            m.name = rel
            members.append(m)
        tar.extractall(dest, members=members, filter="data")


# git apply says "error: patch failed: FILE:LINE" or "error: FILE: <reason>".
_FAILED_AT_RE = re.compile(r"error: patch failed: (\S+):(\d+)")
_FAILED_FILE_RE = re.compile(r"error: (\S+): (.+)")


def _failing_file(stderr: str) -> str:
    m = _FAILED_AT_RE.search(stderr)
    if m:
        return f"{m.group(1)} (hunk at line {m.group(2)})"
    m = _FAILED_FILE_RE.search(stderr)
    if m:
        return f"{m.group(1)} ({m.group(2).strip()})"
    return (stderr.strip().splitlines() or ["git apply gave no reason"])[0]


def apply_series(tree: Path, patches: list[Path]) -> None:
    """Applies the patches in order; on the first that does not apply, names it and its file."""
    env = dict(os.environ)
    # Never let git find an enclosing repository (the cache may live inside one).
    env["GIT_CEILING_DIRECTORIES"] = str(tree.parent)
    for patch in patches:
        if not patch.exists():
            raise BuildError(f"patch {patch.name} is listed in _pins.PATCHES but missing from {patch.parent}")
        proc = subprocess.run(["git", "apply", "--check", "-p1", str(patch)], cwd=tree, env=env,
                              capture_output=True, text=True)
        if proc.returncode == 0:
            proc = subprocess.run(["git", "apply", "-p1", str(patch)], cwd=tree, env=env,
                                  capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"patch {patch.name} does not apply to llama.cpp {_pins.LLAMA_CPP_COMMIT}: "
                             f"{_failing_file(proc.stderr)}")


def prepare_tree(dest: Path, *, patched: bool, sdist: Path | None = None,
                 patches: list[Path] | None = None) -> Path:
    """Creates dest (atomically): the pinned llama.cpp, with the series applied when patched."""
    if dest.exists():
        return dest
    sdist = sdist or fetch_sdist()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        _extract_llama_cpp(sdist, tmp)
        if patched:
            apply_series(tmp, patch_paths() if patches is None else patches)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
