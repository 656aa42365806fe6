"""Calibration profiles: per-model speed levels measured by `calibrate`, stored by the model file's content.

A profile is JSON in profiles_dir()/<sha256 of the model file>.json (format PROFILE_FORMAT): for each
speed level the kernel knobs `calibrate` chose (IceformerSettings field values), the figures measured
with them and whether they met the level's promise (settings.LEVEL_PROMISES). `Llama.set_attention`
takes a level's knobs from the model's profile instead of settings.SPEED_LEVELS; knobs set explicitly
still win. A model without a profile keeps SPEED_LEVELS.

The key is the file's content, so a renamed or copied model keeps its profile and a different file with
the same name does not get it. Hashing a 4 GB file takes seconds, so the hash is memoised in
profiles_dir()/sha256-memo.json by resolved path, size and mtime_ns; and nothing is hashed while the
folder holds no profile at all. A damaged or outdated profile (bad JSON, another format, wrong types) is ignored
with one warning line on stderr, once per process and file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from ..paths import cache_dir, sha256_of
from .settings import DEFAULT_SPEED, SPEED_LEVELS, IceformerSettings

# 2: levels name block_share; a format-1 level would run the library's share, which it was not measured with
PROFILE_FORMAT = 2
_MEMO = "sha256-memo.json"
_warned: set[str] = set()


def profiles_dir() -> Path:
    """$ICEFORMER_LLAMA_PROFILES, else cache_dir()/profiles."""
    env = os.environ.get("ICEFORMER_LLAMA_PROFILES")
    return Path(env).expanduser() if env else cache_dir() / "profiles"


def _write_json(path: Path, value) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(value, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def model_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a model file, memoised by resolved path, size and mtime_ns."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = profiles_dir() / _MEMO
    try:
        memo = json.loads(memo_path.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    digest = memo.get(key)
    if isinstance(digest, str) and len(digest) == 64:
        return digest
    digest = sha256_of(path)
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{path}|")}  # older versions of this file
    memo[key] = digest
    with contextlib.suppress(OSError):   # a read-only cache only costs a rehash next time
        _write_json(memo_path, memo)
    return digest


def profile_path(sha256: str) -> Path:
    return profiles_dir() / f"{sha256}.json"


def _knobs(value) -> dict:
    """A level's knobs from JSON, checked by IceformerSettings (lists become tuples); ValueError if bad."""
    if not isinstance(value, dict) or not value:
        raise ValueError("knobs must be a non-empty object")
    fields = {f.name: f for f in dataclasses.fields(IceformerSettings)}
    knobs = {}
    for name, v in value.items():
        if name not in fields or name == "speed":
            raise ValueError(f"unknown knob {name!r}")
        knobs[name] = tuple(v) if isinstance(v, list) else v
    IceformerSettings(**knobs)
    return knobs


@dataclasses.dataclass(frozen=True)
class Profile:
    """A validated profile: the knobs of every speed level, and the whole JSON document."""
    path: Path
    levels: dict[int, dict]
    data: dict

    def settings_for(self, settings: IceformerSettings) -> IceformerSettings:
        """The settings to run: the level's knobs from this profile (DEFAULT_SPEED when none is set), then
        the explicitly set knobs; no speed left (the kernel gets every knob explicitly)."""
        level = settings.speed if settings.speed is not None else DEFAULT_SPEED
        knobs = dataclasses.replace(settings, speed=level).kernel_overrides(levels=self.levels)
        return IceformerSettings(**knobs)


def parse_profile(data, path: Path, sha256: str | None = None) -> Profile:
    """A Profile from a JSON document; ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    fmt = data.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and 1 <= fmt < PROFILE_FORMAT:
        raise ValueError(f"made by an older version: format {fmt}, expected {PROFILE_FORMAT}")
    if fmt != PROFILE_FORMAT:
        raise ValueError(f"format {fmt!r}, expected {PROFILE_FORMAT}")
    if not isinstance(data.get("model_sha256"), str) or (sha256 is not None and data["model_sha256"] != sha256):
        raise ValueError("model_sha256 does not match the file's name")
    levels_in = data.get("levels")
    if not isinstance(levels_in, dict):
        raise ValueError("levels must be an object")
    levels = {}
    for level in SPEED_LEVELS:
        entry = levels_in.get(str(level))
        if not isinstance(entry, dict):
            raise ValueError(f"level {level} is missing")
        if not isinstance(entry.get("meets"), bool):
            raise ValueError(f"level {level}: meets must be true or false")
        try:
            levels[level] = _knobs(entry.get("knobs"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"level {level}: {e}") from None
    return Profile(path, levels, data)


def _warn(path: Path, why: str) -> None:
    if str(path) in _warned:
        return
    _warned.add(str(path))
    print(f"warning: ignoring the calibration profile {path} ({why}); run calibrate again to replace it",
          file=sys.stderr, flush=True)


def load_profile(sha256: str) -> Profile | None:
    """The profile of the model with this content hash; None when there is none or it is damaged."""
    path = profile_path(sha256)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        _warn(path, e.strerror or str(e))
        return None
    try:
        return parse_profile(json.loads(text), path, sha256)
    except ValueError as e:   # json.JSONDecodeError too
        _warn(path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def profile_for(model_path: str | os.PathLike[str]) -> Profile | None:
    """The profile of this model file, or None (without hashing it when no profile exists at all)."""
    folder = profiles_dir()
    try:
        if not any(p.suffix == ".json" and p.name != _MEMO for p in folder.iterdir()):
            return None
    except OSError:
        return None
    try:
        return load_profile(model_sha256(model_path))
    except OSError:
        return None


def save_profile(data: dict) -> Path:
    """Writes a profile document (checked first) to its place; returns the path."""
    path = profile_path(data["model_sha256"])
    parse_profile(data, path, data["model_sha256"])
    _write_json(path, data)
    _warned.discard(str(path))
    return path
