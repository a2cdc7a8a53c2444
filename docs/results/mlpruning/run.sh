#!/usr/bin/env bash
# Reproduces docs/results/mlpruning/: MLPruning of the embedded MiniLM on SST-2 at three
# densities, and greedy layer pruning down to 1 layer on the same budget and in the same run
# home (so both share the unpruned teacher), then the table (table.py).
# Budget, sized for a 2-core CPU: 2,000 training examples, lr 1e-4, max length 64, batch 32,
# 3 seeds (40-42); MLPruning: 2 epochs of masked training + 1 epoch of distillation after
# slicing (level 3 once more at 0.3: 32x32 blocks, half kept, 1 epoch); greedy: 1-epoch
# fine-tunes. About 45 minutes in all, then the latency benchmark.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HOME_DIR="${GLP_RESULTS_HOME:-.glp-results-mlpruning}"
BUDGET=(--task sst2 --train-limit 2000 --epochs 1 --max-length 64 --lr 1e-4 --seeds 3 --home "$HOME_DIR")
start=$(date +%s)
.venv/bin/glp compress --method mlpruning --density 0.5 --density 0.3 --density 0.2 \
  --pruning-epochs 2 --final-epochs 1 "${BUDGET[@]}"
echo "compress: $(( $(date +%s) - start )) s" | tee -a docs/results/mlpruning/timings.txt
start=$(date +%s)
.venv/bin/glp compress --method mlpruning --density 0.3 --pruning-epochs 2 --final-epochs 1 \
  --block-size 32 --block-density 0.5 --block-epochs 1 --registered-model glp-minilm-sst2-mlpruning-blocks \
  "${BUDGET[@]}"
echo "compress with blocks: $(( $(date +%s) - start )) s" | tee -a docs/results/mlpruning/timings.txt
start=$(date +%s)
.venv/bin/glp prune --strategy greedy --remove 5 "${BUDGET[@]}"
echo "prune: $(( $(date +%s) - start )) s" | tee -a docs/results/mlpruning/timings.txt
PYTHONPATH=. .venv/bin/python benchmarks/compressed_latency.py "$HOME_DIR" \
  --out docs/results/mlpruning/latency.json
PYTHONPATH=. .venv/bin/python docs/results/mlpruning/table.py "$HOME_DIR" docs/results/mlpruning/latency.json \
  | tee docs/results/mlpruning/table.md
PYTHONPATH=. .venv/bin/python docs/results/mlpruning/textpruner_anchor.py "$HOME_DIR" 0.5 0.3 0.2 \
  | tee docs/results/mlpruning/textpruner.jsonl
