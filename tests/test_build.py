"""The build: verified source, CPU flags without AMX, content-keyed cache, atomic installs."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from iceformer_llama import _pins

from iceformer_llama.building import build
from iceformer_llama.errors import BuildError
from iceformer_llama.building.source import downloads_dir, fetch_sdist

from conftest import ROOT, assert_one_line_error, run_cli


def test_amx_is_disabled_when_the_cpu_reports_it():
    flags = build.cpu_flags({"__AVX512F__", "__AMX_TILE__", "__AMX_INT8__"})
    assert flags["cpu_has_amx"]
    assert {"-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"} <= set(flags["CMAKE_C_FLAGS"].split())
    assert flags["CMAKE_CXX_FLAGS"] == flags["CMAKE_C_FLAGS"]
    defines = build.cmake_defines(flags, patched=True)
    assert "-DGGML_AMX_INT8=OFF" in defines and "-DGGML_NATIVE=ON" in defines
    assert build.cpu_flags({"__AVX2__"})["CMAKE_C_FLAGS"] == ""


def test_the_compiler_enables_no_amx_with_our_flags():
    flags = build.cpu_flags()
    out = subprocess.run(["cc", "-march=native", *flags["CMAKE_C_FLAGS"].split(), "-dM", "-E", "-x", "c",
                          os.devnull], capture_output=True, text=True, check=True).stdout
    assert "__AMX" not in out


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_built_libraries_contain_no_amx_instructions(builds):
    for info in builds.values():
        for lib in info.lib_dir.glob("libggml-cpu*.so"):
            asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True,
                                 text=True, check=True).stdout
            assert asm.count("\n") > 1000
            for insn in ("tileloadd", "tdpbssd", "tdpbf16ps", "ldtilecfg"):
                assert f"\t{insn}" not in asm, f"{lib.name} contains {insn}"


def test_sha256_mismatch_is_an_error_and_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("ICEFORMER_LLAMA_CACHE", str(tmp_path))
    bogus = downloads_dir() / _pins.LLAMA_CPP_PYTHON_SDIST
    bogus.parent.mkdir(parents=True)
    bogus.write_bytes(b"not the llama-cpp-python source")
    with pytest.raises(BuildError, match="sha256 mismatch"):
        fetch_sdist()
    assert not bogus.exists()
    assert not (tmp_path / "work").exists()


def test_sha256_mismatch_from_the_cli_is_one_line(tmp_path):
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / _pins.LLAMA_CPP_PYTHON_SDIST).write_bytes(b"tampered")
    proc = run_cli("build", "--stock", env={"ICEFORMER_LLAMA_CACHE": str(cache)})
    assert_one_line_error(proc, "sha256 mismatch")


def test_a_rebuild_with_nothing_changed_takes_under_two_seconds(builds):
    start = time.monotonic()
    proc = run_cli("build")
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(builds["patched"].lib_dir)
    assert elapsed < 2.0, f"no-op build took {elapsed:.2f} s"


def test_build_info_names_both_builds(builds):
    proc = run_cli("build", "--info")
    assert proc.returncode == 0, proc.stderr
    for info in builds.values():
        assert str(info.lib_dir) in proc.stdout
    assert "up to date" in proc.stdout and _pins.LLAMA_CPP_COMMIT in proc.stdout


def test_the_key_changes_with_native_sources_and_flags(monkeypatch):
    flags = build.cpu_flags({"__AVX2__"})
    key = build.build_key("patched", flags)
    assert build.build_key("patched", flags) == key
    assert build.build_key("patched", {**flags, "CMAKE_C_FLAGS": "-O1"}) != key
    assert build.build_key("stock", flags) != key
    real = build.native_sources()
    monkeypatch.setattr(build, "native_sources", lambda: real[:-1])
    assert build.build_key("patched", flags) != key


def test_a_failed_build_keeps_the_last_good_one(builds, tmp_path, monkeypatch):
    # A private cache holding a copy of the good stock build and the verified source.
    cache = tmp_path / "cache"
    (cache / "builds").mkdir(parents=True)
    good = builds["stock"]
    shutil.copytree(good.path, cache / "builds" / good.path.name)
    (cache / "builds" / "stock.last-good").write_text(good.path.name)
    (cache / "downloads").mkdir()
    os.symlink(fetch_sdist(), cache / "downloads" / _pins.LLAMA_CPP_PYTHON_SDIST)
    monkeypatch.setenv("ICEFORMER_LLAMA_CACHE", str(cache))

    # New flags (a new key) that the compiler rejects: configuring fails.
    bad = {**build.cpu_flags(), "CMAKE_C_FLAGS": "-mno-such-flag-for-iceformer"}
    monkeypatch.setattr(build, "cpu_flags", lambda macros=None: bad)
    with pytest.raises(BuildError, match="failed"):
        build.build("stock", progress=False, log=lambda m: None)

    found = build.find_build("stock")
    assert found is not None and not found.current
    assert found.path.name == good.path.name and found.libllama.exists()
    assert not [p for p in (cache / "builds").iterdir() if p.name.startswith(".")]


def _cli_without_llama_cpp(*args, cache):
    """The CLI in a Python where llama-cpp-python's Python layer cannot be found."""
    code = ("import sys; sys.modules['llama_cpp'] = None\n"  # find_spec() then answers None, as when not installed
            "from iceformer_llama.commands.cli import main\n"
            f"sys.exit(main({list(map(str, args))!r}))")
    env = dict(os.environ, ICEFORMER_LLAMA_CACHE=str(cache))
    env.pop("ICEFORMER_LLAMA_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_build_without_the_python_layer_says_run_setup_before_compiling(tmp_path):
    start = time.monotonic()
    proc = _cli_without_llama_cpp("build", "--stock", cache=tmp_path / "cache")
    assert_one_line_error(proc, "llama-cpp-python", "run: python -m iceformer_llama setup")
    assert time.monotonic() - start < 30, "it compiled before checking"
    assert not (tmp_path / "cache" / "work").exists()

    info = _cli_without_llama_cpp("build", "--info", cache=tmp_path / "cache")
    assert info.returncode == 0, info.stderr
    assert "python -m iceformer_llama setup" in info.stdout
    assert "iceformer_llama build" not in info.stdout


@pytest.mark.build
def test_two_builds_at_once_into_an_empty_cache_run_one_build(tmp_path):
    """Two `build --stock` processes started together: both succeed, one compiles, one log."""
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    os.symlink(fetch_sdist(), cache / "downloads" / _pins.LLAMA_CPP_PYTHON_SDIST)
    env = dict(os.environ, ICEFORMER_LLAMA_CACHE=str(cache))
    cmd = [sys.executable, "-m", "iceformer_llama", "build", "--stock"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(2)]
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert outs[0][0] == outs[1][0] and outs[0][0].strip().endswith("/lib")
    stderr = outs[0][1] + outs[1][1]
    assert stderr.count(f"building stock llama.cpp {_pins.LLAMA_CPP_COMMIT}") == 1, stderr  # the build's own line
    assert "waiting for another iceformer-llama process" in stderr, stderr
    log = (cache / "work" / "stock" / "build.log").read_text()
    assert log.count("$ ") == 2, "one cmake and one ninja run in the log"  # configure + compile, once
    assert len(list((cache / "builds").glob("stock-*"))) == 1
