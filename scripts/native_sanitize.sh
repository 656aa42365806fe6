#!/usr/bin/env bash
# Runs the native code under AddressSanitizer + UndefinedBehaviorSanitizer:
#  1. native/tests/test_main.c built with -fsanitize=address,undefined,leak (leaks checked);
#  2. the cffi module rebuilt with ICEFORMER_SANITIZE=1 into a temporary directory and the
#     native pytest suite run against it (libasan preloaded; leak checks off for Python).
# Exits non-zero on any sanitizer report or test failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cc="${CC:-gcc}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

echo "== C driver (ASan + UBSan + LSan)"
"$cc" -std=c11 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,leak -fno-sanitize-recover=all \
    -Wall -Wextra -I"$root/native/include" "$root/native/tests/test_main.c" "$root"/native/src/*.c -lm -o "$tmp/test_main"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" "$tmp/test_main"
ICEFORMER_SIMD=avx512 ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" "$tmp/test_main"
ICEFORMER_SIMD=avx2 ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" "$tmp/test_main"
ICEFORMER_SIMD=scalar ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" "$tmp/test_main"

echo "== native/bench compiles"
"$cc" -std=c11 -fsyntax-only -Wall -Wextra -Werror -I"$root/native/include" "$root"/native/bench/*.c

echo "== Python tests against the sanitized cffi module"
mkdir -p "$tmp/pkg"
cp -r "$root/iceformer_llama" "$tmp/pkg/"
rm -f "$tmp/pkg/iceformer_llama"/_iceformer_native*.so
( cd "$root" && ICEFORMER_SANITIZE=1 python -c "
import sys, glob, shutil, os
sys.path.insert(0, 'iceformer_llama')
import _native_build as b
so = b.make_ffibuilder(absolute_paths=True).compile(tmpdir='$tmp/build')
shutil.copy(so, '$tmp/pkg/iceformer_llama/')
" >/dev/null )
asan="$("$cc" -print-file-name=libasan.so)"
ubsan="$("$cc" -print-file-name=libubsan.so)"
cd "$tmp"
PYTHONPATH="$tmp/pkg:$root/tests" LD_PRELOAD="$asan:$ubsan" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" \
    python -m pytest -q -p no:cacheprovider --rootdir="$tmp" "$root/tests/test_native_index.py" "$root/tests/test_native_attention.py" "$root/tests/test_native_persistent.py" "$@"
echo "sanitizers: clean"
