#!/usr/bin/env bash
# Reproduces docs/results/grain/: GRAIN of the embedded MiniLM on SST-2 at three densities
# (and once at 0.1 with the word embeddings left whole), next to MLPruning and greedy layer
# pruning on the same budget and in the same run home, so that every method starts from
# the same fine-tuned teachers (a home that ran docs/results/mlpruning/run.sh reuses them,
# and its MLPruning and greedy models, from the cache).
# Budget, sized for a 2-core CPU: 2,000 training examples, lr 1e-4, max length 64, batch 32,
# 3 seeds (40-42); GRAIN: 3 epochs (pruning between 20% and 40% of the steps, as the
# reference); MLPruning: 2 + 1 epochs; greedy: 1-epoch fine-tunes.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HOME_DIR="${GLP_RESULTS_HOME:-.glp-results-mlpruning}"
BUDGET=(--task sst2 --train-limit 2000 --epochs 1 --max-length 64 --lr 1e-4 --seeds 3 --home "$HOME_DIR")
OUT=docs/results/grain
timed() {
  local name=$1; shift
  local start; start=$(date +%s)
  "$@"
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$OUT/timings.txt"
}
timed "grain 0.2 0.1 0.05" .venv/bin/glp compress --method grain --density 0.2 --density 0.1 \
  --density 0.05 --pruning-epochs 3 "${BUDGET[@]}"
timed "grain 0.1, full embeddings" .venv/bin/glp compress --method grain --density 0.1 \
  --pruning-epochs 3 --embedding-rank 0 --registered-model glp-minilm-sst2-grain-full-embeddings \
  "${BUDGET[@]}"
timed "mlpruning 0.5 0.3 0.2" .venv/bin/glp compress --method mlpruning --density 0.5 \
  --density 0.3 --density 0.2 --pruning-epochs 2 --final-epochs 1 "${BUDGET[@]}"
timed "greedy" .venv/bin/glp prune --strategy greedy --remove 5 "${BUDGET[@]}"
PYTHONPATH=. .venv/bin/python benchmarks/compressed_latency.py "$HOME_DIR" --out "$OUT/latency.json"
PYTHONPATH=. .venv/bin/python docs/results/mlpruning/table.py "$HOME_DIR" "$OUT/latency.json" \
  | tee "$OUT/table.md"
PYTHONPATH=. .venv/bin/python "$OUT/structure.py" "$HOME_DIR" | tee "$OUT/structure.md"
