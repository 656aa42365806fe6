#!/usr/bin/env bash
# Full accuracy evaluation of IceFormer against dense on the bundled model: teacher-forced top-1 agreement,
# KL and perplexity on 1024/2048/4096-token documents, passkey and line retrieval at the same lengths and
# depths 0.1/0.5/0.9 (2 prompts each), for a sweep of settings (the curve to choose from).
# Writes results/eval.json, results/eval.png and results/eval.txt (the tables).
# Extra arguments are passed on (and may add --variant settings), e.g.:  scripts/eval.sh --lengths 1024,2048
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p results
out=results/eval.json
for ((i = 1; i <= $#; i++)); do
    if [[ ${!i} == --out || ${!i} == -o ]]; then j=$((i + 1)); out=${!j}; fi
done
"$PY" -m iceformer_llama eval --out "$out" \
    --variant "" \
    --variant top_k=32 \
    --variant top_k=128 \
    --variant top_blocks=8,block_size=32 \
    --variant top_blocks=16,block_size=32 \
    --variant top_k=0,top_blocks=16,block_size=32 \
    --variant tail_estimate=off \
    "$@" | tee "${out%.json}.txt"
