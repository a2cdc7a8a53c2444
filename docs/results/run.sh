#!/usr/bin/env bash
# Reproduces docs/results/: glp compare on the embedded MiniLM for five GLUE tasks,
# sized for a 2-core CPU: 2,000 training examples, 1 epoch, lr 1e-4 (the demo's budget, which
# learns on SST-2; at 1,000 examples x 1 epoch every candidate stayed at the majority class),
# 3 seeds, 2 random orders, up to 2 of 6 layers removed.
# Usage: bash docs/results/run.sh [task ...]   (default: all five); ~30 min per task on CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_DIR="${GLP_RESULTS_HOME:-.glp-results}"
TASKS=("${@:-sst2 mrpc rte cola stsb}")
for task in ${TASKS[@]}; do
  start=$(date +%s)
  case "$task" in sst2|cola) length=64 ;; *) length=128 ;; esac  # single sentences are short
  .venv/bin/glp compare --task "$task" --remove 2 --train-limit 2000 --epochs 1 --lr 1e-4 \
    --max-length "$length" --seeds 3 --random-orders 2 --home "$HOME_DIR"
  report=$(ls -td "$HOME_DIR"/reports/compare-*-"$task"-* | head -1)
  rm -rf "docs/results/$task" && cp -r "$report" "docs/results/$task"
  echo "$task: $(( $(date +%s) - start )) s" | tee -a docs/results/timings.txt
done
