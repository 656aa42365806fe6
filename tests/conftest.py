import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _no_user_profiles(tmp_path_factory):
    """Calibration profiles in an empty folder of the test run's own: a profile the user made for the
    bundled model must not change what the tests measure (the builds and models stay in the real cache)."""
    saved = os.environ.get("ICEFORMER_LLAMA_PROFILES")
    os.environ["ICEFORMER_LLAMA_PROFILES"] = str(tmp_path_factory.mktemp("profiles"))
    yield
    if saved is None:
        os.environ.pop("ICEFORMER_LLAMA_PROFILES", None)
    else:
        os.environ["ICEFORMER_LLAMA_PROFILES"] = saved


def run_cli(*args, input=None, timeout=600, env=None):
    """Runs `python -m iceformer_llama ARGS` as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("ICEFORMER_LLAMA_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "iceformer_llama", *map(str, args)], input=input,
                          capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def assert_one_line_error(proc, *fragments):
    """A user error: non-zero exit, no traceback, one line on stderr naming the problem."""
    assert proc.returncode not in (0, None) and proc.returncode > 0, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="session")
def bundled_model():
    from iceformer_llama.runtime.models import bundled_model_path

    path = bundled_model_path()
    if path is None:
        pytest.fail("the bundled model is not fetched; run: python -m iceformer_llama setup")
    return path


@pytest.fixture(scope="session")
def patched_build():
    """The patched build must exist (eval and the runtime need no stock build)."""
    from iceformer_llama.building.build import find_build

    found = find_build("patched")
    if found is None or not found.current:
        pytest.fail("missing or outdated patched build; run: python -m iceformer_llama setup")
    return found


@pytest.fixture(scope="session")
def builds():
    """Both builds must exist (make test builds them once per run)."""
    from iceformer_llama.building.build import find_build

    found = {kind: find_build(kind) for kind in ("patched", "stock")}
    missing = [k for k, v in found.items() if v is None or not v.current]
    if missing:
        pytest.fail(f"missing or outdated builds: {missing}; run: python -m iceformer_llama setup --stock")
    return found


@pytest.fixture(scope="session")
def portable_builds(bundled_model):
    """Both portable builds (built once, 5-10 minutes each on 2 cores, then cached)."""
    from iceformer_llama.building import build

    return {kind: build.build(kind, portable=True, smoke_model=bundled_model, log=lambda m: print(m, file=sys.stderr))
            for kind in build.KINDS}
