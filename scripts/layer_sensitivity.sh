#!/usr/bin/env bash
# Where a model's attention error comes from, layer by layer: eval (teacher-forced top-1 agreement, KL and
# perplexity against dense) with the per-layer budget off, once as is and once per group of layers kept
# exact (dense_layers). A group whose exactness removes much of the KL needs a larger share of the blocks;
# the bundled model's former hand-made per-layer budget was chosen this way (docs/results.md, "Per-layer budgets").
#
#   scripts/layer_sensitivity.sh --n-layers 30 --group 3 --lengths 4096,8192 --out results/layer-sensitivity.json
#
# --n-layers (default 30, the bundled model) and --group (layers per variant, default 3) are read here;
# every other argument goes to `python -m iceformer_llama eval` (e.g. --model, --lengths, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
n_layers=30 group=3 rest=()
while (($#)); do
    case $1 in
        --n-layers) n_layers=$2; shift 2 ;;
        --group) group=$2; shift 2 ;;
        *) rest+=("$1"); shift ;;
    esac
done
if ! [[ $n_layers =~ ^[1-9][0-9]*$ && $group =~ ^[1-9][0-9]*$ ]]; then
    echo "layer_sensitivity.sh: --n-layers and --group take positive integers" >&2
    exit 2
fi
variants=(--variant "layer_budget=none")
for ((g = 0; g < n_layers; g += group)); do
    layers=$(seq -s + "$g" $((g + group - 1 < n_layers - 1 ? g + group - 1 : n_layers - 1)))
    variants+=(--variant "layer_budget=none,dense_layers=$layers")
done
exec "$PY" -m iceformer_llama eval --tasks none --rounding-floor off --threads 2 "${variants[@]}" "${rest[@]}"
