"""Where iceformer-llama keeps what it downloads and builds."""

import hashlib
import os
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
