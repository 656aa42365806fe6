"""cffi API-mode builder of iceformer_llama._iceformer_native (native/src/*.c).

Used two ways:
  * setup.py: cffi_modules=["iceformer_llama/_native_build.py:ffibuilder"]
  * in place: python iceformer_llama/_native_build.py   (writes iceformer_llama/_iceformer_native*.so)

Flags: -O3 -std=c11; no -march: SIMD variants are compiled with target attributes and
chosen at run time (see native/src/simd.c), so one build runs on any x86-64 or aarch64.
ICEFORMER_SANITIZE=1 builds with -fsanitize=address,undefined -O1 -g instead.
"""

import glob
import os
import sys

import cffi

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NATIVE = os.path.join(_ROOT, "native")
_INCLUDE = os.path.join(_NATIVE, "include")


def _rel(path):
    # setuptools wants sources relative to the project root; builds run from there
    return os.path.relpath(path, _ROOT)


def _compile_args():
    args = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if os.environ.get("ICEFORMER_SANITIZE") == "1":
        args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", "-O1", "-g"]
    else:
        args += ["-O3"]
    return args


def _link_args():
    if os.environ.get("ICEFORMER_SANITIZE") == "1":
        return ["-fsanitize=address,undefined"]
    return []


def make_ffibuilder(absolute_paths=False):
    """The builder; setup.py wants relative sources, FFI.compile() (which changes
    directory to its tmpdir) wants absolute ones."""
    fb = cffi.FFI()
    with open(os.path.join(_INCLUDE, "iceformer.cdef")) as f:
        fb.cdef(f.read())
    sources = sorted(glob.glob(os.path.join(_NATIVE, "src", "*.c")))
    fb.set_source(
        "iceformer_llama._iceformer_native",
        '#include "iceformer.h"',
        sources=sources if absolute_paths else [_rel(p) for p in sources],
        include_dirs=[_INCLUDE],
        depends=sorted(glob.glob(os.path.join(_NATIVE, "src", "*.h"))) + [os.path.join(_INCLUDE, "iceformer.h")],
        extra_compile_args=_compile_args(),
        extra_link_args=_link_args(),
        libraries=["m"],
    )
    return fb


ffibuilder = make_ffibuilder()


def build_in_place(tmpdir=None, verbose=False):
    """Compiles the extension into iceformer_llama/ and returns the path of the .so."""
    tmpdir = tmpdir or os.path.join(_ROOT, "build", "cffi")
    os.makedirs(tmpdir, exist_ok=True)
    built = make_ffibuilder(absolute_paths=True).compile(tmpdir=tmpdir, verbose=verbose)
    dest = os.path.join(_ROOT, "iceformer_llama", os.path.basename(built))
    if os.path.abspath(built) != os.path.abspath(dest):
        import shutil

        shutil.copyfile(built, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
    return dest


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else None
    print(build_in_place(tmpdir=out, verbose="-v" in sys.argv))
