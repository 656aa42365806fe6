"""The wheelhouse: installed with no compiler, no cmake and no package index, it chats and generates."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from iceformer_llama import __version__, _pins
from iceformer_llama.building import wheelhouse

pytestmark = [pytest.mark.build, pytest.mark.network]


@pytest.fixture(scope="module")
def house(tmp_path_factory, portable_builds, bundled_model):
    dest = tmp_path_factory.mktemp("wheelhouse")
    wheels = wheelhouse.make_wheelhouse(dest, model=bundled_model, smoke_model=bundled_model,
                                        log=lambda m: print(m, file=sys.stderr))
    return dest, wheels


def _one(wheels, prefix):
    found = [w for w in wheels if w.name.startswith(prefix)]
    assert len(found) == 1, [w.name for w in wheels]
    return found[0]


def test_the_package_wheel_carries_both_portable_builds(house, bundled_model):
    _, wheels = house
    ours = _one(wheels, f"iceformer_llama-{__version__}-")
    assert not ours.name.endswith("-none-any.whl")  # a platform wheel: it holds compiled code
    with zipfile.ZipFile(ours) as z:
        names = set(z.namelist())
        for kind in ("patched", "stock"):
            base = f"iceformer_llama/_libs/{kind}/"
            assert {base + n for n in ("libllama.so", "libggml.so.0", "libggml-base.so.0", "build.json")} <= names
            assert any(n.startswith(base + "libggml-cpu-") for n in names)
            assert base + "libggml-cpu-sapphirerapids.so" not in names
            manifest = json.loads(z.read(base + "build.json"))
            assert manifest["portable"] and manifest["flags"]["GGML_CPU_ALL_VARIANTS"] == "ON"
        assert not any(n.startswith(("native/", "patches/")) for n in names)
        assert f"iceformer_llama/_model/{bundled_model.name}" in names
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        assert f"Requires-Dist: llama-cpp-python=={_pins.LLAMA_CPP_PYTHON_VERSION}" in metadata
        assert "Requires-Dist: cmake" not in metadata.split("Provides-Extra")[0]
    layer = _one(wheels, f"llama_cpp_python-{_pins.LLAMA_CPP_PYTHON_VERSION}-")
    with zipfile.ZipFile(layer) as z:
        assert not any(n.endswith((".so", ".dylib")) for n in z.namelist())  # its Python layer only


def test_installed_offline_without_a_compiler_it_generates(house, tmp_path):
    dest, _ = house
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bindir = venv / "bin"
    env = {"PATH": str(bindir), "HOME": str(tmp_path), "ICEFORMER_LLAMA_CACHE": str(tmp_path / "cache"),
           "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "LANG": "C.UTF-8"}
    for tool in ("cc", "gcc", "c++", "g++", "cmake", "ninja"):
        assert shutil.which(tool, path=env["PATH"]) is None, tool
    pip = subprocess.run([str(bindir / "python"), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                          str(dest), "iceformer-llama"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr
    info = subprocess.run([str(bindir / "python"), "-m", "iceformer_llama", "build", "--info"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "patched in use: " + str(venv) in info.stdout and "shipped in the package, portable" in info.stdout
    for attention in ("iceformer", "dense"):
        cmd = [str(bindir / "python"), "-m", "iceformer_llama", "generate", "-p", "The capital of France is",
               "-n", "4", "--ctx-size", "128", "--json", "--attention", attention]
        if attention == "iceformer":
            cmd += ["--min-n-kv", "16"]  # the kernel, not upstream's dense path, answers this short prompt
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["attention"] == attention and out["backend"] == "patched" and "Paris" in out["text"]
        assert out["model"].startswith(str(venv))  # the model came with the wheelhouse
    chat = subprocess.run([str(bindir / "python"), "-m", "iceformer_llama", "chat", "-n", "8", "--temp", "0",
                           "--ctx-size", "512"], input="What is the capital of France?\n", capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
