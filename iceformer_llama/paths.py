"""Where iceformer-llama keeps what it downloads and builds, and the locks that keep it whole."""

import contextlib
import hashlib
import os
import sys
from pathlib import Path

# A source checkout: native/ and patches/ live beside the package (a wheel ships built libraries instead).
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """$ICEFORMER_LLAMA_CACHE, else ~/.cache/iceformer-llama (XDG_CACHE_HOME honoured)."""
    env = os.environ.get("ICEFORMER_LLAMA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iceformer-llama"


@contextlib.contextmanager
def cache_lock(name: str, *, waiting_for: str, log=None):
    """Holds an inter-process lock on one step that writes the cache (a build, a download).

    Two processes started at once on an empty cache (two `setup` runs, an app started twice) would
    otherwise build into the same folders and write one log. The second waits, says so once, and
    then finds the first one's result.
    """
    from filelock import FileLock, Timeout

    path = cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say = log or (lambda m: print(m, file=sys.stderr, flush=True))
        say(f"waiting for another iceformer-llama process {waiting_for} (lock: {path})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
