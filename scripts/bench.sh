#!/usr/bin/env bash
# Full speed benchmark: stock vs patched llama.cpp, prefill and decode tokens/s over the context ladder
# (512..8192, capped at the model's trained context), 3 repetitions after one warm-up, on the bundled model.
# Writes results/bench.json, results/bench.png and results/bench.txt (the table).
# Extra arguments are passed on, e.g.:  scripts/bench.sh --model llama-2-7b --top-blocks 8 --out results/bench-7b.json
# Run it on an otherwise idle machine: llama.cpp's threads spin, so any other load distorts the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p results
out=results/bench.json
for ((i = 1; i <= $#; i++)); do
    if [[ ${!i} == --out || ${!i} == -o ]]; then j=$((i + 1)); out=${!j}; fi
done
"$PY" -m iceformer_llama bench --out "$out" "$@" | tee "${out%.json}.txt"
