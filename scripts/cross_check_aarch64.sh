#!/usr/bin/env bash
# Cross-check of the native kernel (native/src/*.c + native/tests/test_main.c) without an aarch64 machine:
#  1. aarch64: built static with aarch64-linux-gnu-gcc and run under qemu-aarch64 (the portable loops:
#     simd.c has no NEON path, so ice_simd_name must say "scalar");
#  2. x86-64 baseline (-march=x86-64): run under `qemu-x86_64 -cpu Nehalem` (no AVX2: the scalar path is
#     chosen by the CPU check) and natively with ICEFORMER_SIMD=scalar and with the default level;
#  3. informational: which of the -march strings ggml's GGML_CPU_ALL_VARIANTS uses for aarch64 Linux
#     this cross compiler accepts (ggml/src/ggml-cpu/CMakeLists.txt; GCC 12 knows neither armv9.2-a nor +sme).
# Installs nothing: when aarch64-linux-gnu-gcc or qemu-aarch64 is missing it says so and exits 0
# (apt-get install gcc-aarch64-linux-gnu qemu-user). Exits non-zero when a build or a test fails.
# Env: CROSS_CC (default aarch64-linux-gnu-gcc), CC (default gcc), OPT (default -O2), WERROR=1 adds -Werror.
# Takes a few minutes: every emulated run of the test program is about a minute.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cross_cc="${CROSS_CC:-aarch64-linux-gnu-gcc}"
cc="${CC:-gcc}"
opt="${OPT:--O2}"
werror=()
[ "${WERROR:-0}" = 1 ] && werror=(-Werror)

missing=()
command -v "$cross_cc" >/dev/null 2>&1 || missing+=("$cross_cc (apt-get install gcc-aarch64-linux-gnu)")
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=("qemu-aarch64 (apt-get install qemu-user)")
if [ ${#missing[@]} -gt 0 ]; then
    printf 'missing: %s\n' "${missing[@]}"
    echo "cross_check_aarch64: skipped"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
srcs=("$root"/native/src/*.c "$root/native/tests/test_main.c")
flags=(-std=c11 "$opt" -Wall -Wextra "${werror[@]}" -I"$root/native/include" -static)

# runs the test program ($2...) and checks its last line names simd level $1
run_test() {
    local want="$1"; shift
    local out
    out="$("$@")"
    echo "$out"
    case "$out" in
        *"native C driver: ok (simd: $want)"*) ;;
        *) echo "FAIL: expected simd: $want from: $*"; return 1 ;;
    esac
}

echo "== aarch64: $("$cross_cc" -dumpfullversion 2>/dev/null || "$cross_cc" -dumpversion), ${flags[*]}"
"$cross_cc" "${flags[@]}" "${srcs[@]}" -lm -o "$tmp/test_main_aarch64"
file "$tmp/test_main_aarch64" 2>/dev/null | cut -d, -f1-2 || true
run_test scalar qemu-aarch64 "$tmp/test_main_aarch64"

if [ "$(uname -m)" = x86_64 ] && command -v "$cc" >/dev/null 2>&1; then
    echo "== x86-64 baseline: $cc -march=x86-64 ${flags[*]}"
    "$cc" -march=x86-64 "${flags[@]}" "${srcs[@]}" -lm -o "$tmp/test_main_x86_64"
    if command -v qemu-x86_64 >/dev/null 2>&1; then
        echo "-- qemu-x86_64 -cpu Nehalem"
        run_test scalar qemu-x86_64 -cpu Nehalem "$tmp/test_main_x86_64"
    else
        echo "-- qemu-x86_64 missing: the Nehalem run is skipped"
    fi
    echo "-- native, ICEFORMER_SIMD=scalar"
    ICEFORMER_SIMD=scalar run_test scalar "$tmp/test_main_x86_64"
    echo "-- native, default level"
    "$tmp/test_main_x86_64"
else
    echo "== x86-64 part skipped (host $(uname -m), or no $cc)"
fi

echo "== ggml GGML_CPU_ALL_VARIANTS -march strings (aarch64 Linux) accepted by $cross_cc"
printf 'int f(void) { return 0; }\n' > "$tmp/empty.c"
for m in armv8-a armv8.2-a+dotprod armv8.2-a+dotprod+fp16 armv8.2-a+dotprod+fp16+sve \
         armv8.6-a+dotprod+fp16+sve+i8mm armv8.6-a+dotprod+fp16+sve+i8mm+sve2 \
         armv9.2-a+dotprod+fp16+sve+i8mm+sme armv9.2-a+dotprod+fp16+sve+i8mm+sve2+sme; do
    if err="$("$cross_cc" -c -march="$m" "$tmp/empty.c" -o "$tmp/empty.o" 2>&1)"; then
        echo "  ok       -march=$m"
    else
        echo "  REJECTED -march=$m: $(printf '%s\n' "$err" | grep -m1 error || true)"
    fi
done
echo "cross_check_aarch64: passed"
