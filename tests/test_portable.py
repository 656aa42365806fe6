"""The portable build: ggml's CPU code for every ISA level as modules, chosen at run time; it generates
text on older CPUs (emulated with qemu-user) and is what a wheel ships."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from iceformer_llama.building import build
from iceformer_llama.building.ggml_modules import cpu_modules

from conftest import ROOT, run_cli

QEMU = shutil.which("qemu-x86_64")
X86 = os.uname().machine == "x86_64"


def test_portable_flags_do_not_depend_on_this_cpu():
    flags = build.portable_flags()
    defines = build.cmake_defines(flags, patched=True)
    assert {"-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"} <= set(defines)
    assert build.build_key("patched", flags) != build.build_key("patched", build.cpu_flags())
    assert build.build_flags(True) == flags and build.build_flags(False) == build.cpu_flags()


@pytest.mark.build
def test_portable_libraries_hold_cpu_modules_and_no_amx_module(portable_builds):
    for info in portable_builds.values():
        names = {f.name for f in cpu_modules(info.lib_dir)}
        if X86:
            assert {"libggml-cpu-x64.so", "libggml-cpu-sse42.so", "libggml-cpu-haswell.so"} <= names
        assert "libggml-cpu-sapphirerapids.so" not in names
        assert not (info.lib_dir / "libggml-cpu.so").exists()
        manifest = info.manifest()
        assert manifest["portable"] and manifest["flags"]["GGML_BACKEND_DL"] == "ON"
        assert manifest["system_info"]  # recorded by the smoke test


@pytest.mark.build
def test_build_info_lists_the_portable_builds(portable_builds):
    proc = run_cli("build", "--info")
    assert proc.returncode == 0, proc.stderr
    assert "GGML_CPU_ALL_VARIANTS=ON" in proc.stdout
    for info in portable_builds.values():
        assert f"({'portable'}): up to date" in proc.stdout and str(info.lib_dir) in proc.stdout


def _generate(prefix, *, attention, extra_env=None, timeout=900):
    env = dict(os.environ, ICEFORMER_LLAMA_BUILD="portable", **(extra_env or {}))
    # --min-n-kv 16: the kernel (not upstream's dense path) answers this short prompt
    cmd = [*prefix, sys.executable, "-m", "iceformer_llama", "generate", "-p", "The capital of France is",
           "-n", "4", "--ctx-size", "128", "--threads", "2", "--json", "--attention", attention]
    if attention == "iceformer":
        cmd += ["--min-n-kv", "16", "--window", "4", "--top-blocks", "1", "--block-size", "4"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.build
@pytest.mark.parametrize("attention", ["iceformer", "dense"])
def test_the_portable_build_generates_on_this_cpu(portable_builds, bundled_model, attention):
    proc = _generate([], attention=attention)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["attention"] == attention and "Paris" in out["text"]
    assert "load_backend" not in proc.stderr  # ggml's note of the module it chose stays off the user's screen


def _system_info(prefix, lib_dir, model):
    proc = subprocess.run([*prefix, sys.executable, "-m", "iceformer_llama.building.smoke", str(lib_dir), str(model)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.build
@pytest.mark.skipif(not X86, reason="the emulated CPUs are x86-64 ones")
@pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed (Debian: apt-get install qemu-user)")
@pytest.mark.parametrize("cpu,has,lacks", [
    ("Nehalem", "SSE3 = 1", "AVX = 1"),        # SSE4.2, no AVX: the sse42 module, the kernel's scalar path
    ("Haswell", "AVX2 = 1", "AVX512 = 1"),     # AVX2 + FMA + F16C: the haswell module, the kernel's AVX2 path
])
def test_the_portable_build_generates_on_an_emulated_older_cpu(portable_builds, bundled_model, cpu, has, lacks):
    prefix = [QEMU, "-cpu", cpu]
    info = _system_info(prefix, portable_builds["patched"].lib_dir, bundled_model)
    assert has in info and lacks not in info, info
    for attention in ("iceformer", "dense"):
        proc = _generate(prefix, attention=attention)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["attention"] == attention and "Paris" in out["text"], out["text"]


@pytest.mark.build
@pytest.mark.skipif(not X86 or QEMU is None, reason="needs x86-64 and qemu-user")
def test_the_native_build_is_not_portable(builds, bundled_model):
    """The check above can fail: this machine's native build does not run on a Nehalem."""
    proc = subprocess.run([QEMU, "-cpu", "Nehalem", sys.executable, "-m", "iceformer_llama.building.smoke",
                           str(builds["patched"].lib_dir), str(bundled_model)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode != 0


def test_on_aarch64_without_armv9_2_support_the_portable_build_is_baseline_armv8(monkeypatch):
    monkeypatch.setattr(build, "compiler_accepts", lambda cc, flag: False)  # GCC 12: no -march=armv9.2-a+sme
    flags = build.portable_flags(machine="aarch64")
    assert flags["GGML_CPU_ARM_ARCH"] == "armv8-a" and flags["GGML_BACKEND_DL"] == "OFF"
    monkeypatch.setattr(build, "compiler_accepts", lambda cc, flag: True)
    assert build.portable_flags(machine="aarch64")["GGML_CPU_ALL_VARIANTS"] == "ON"
    assert build.portable_flags(machine="x86_64")["GGML_CPU_ALL_VARIANTS"] == "ON"


def test_the_compiler_probe_answers_both_ways():
    assert build.compiler_accepts("cc", "-O2")
    assert not build.compiler_accepts("cc", "-mno-such-option-for-iceformer")
