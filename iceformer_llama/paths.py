"""Where iceformer-llama keeps what it downloads and builds."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$ICEFORMER_LLAMA_CACHE, else ~/.cache/iceformer-llama (XDG_CACHE_HOME honoured)."""
    env = os.environ.get("ICEFORMER_LLAMA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iceformer-llama"
