#!/usr/bin/env bash
# Reproduces docs/results/: glp compare on the embedded MiniLM for five GLUE tasks, sized for a
# 2-core CPU: 3 seeds, 2 random orders, up to 2 of 6 layers removed, and a per-task
# number of training examples, epochs, learning rate and batch size (README.md here says why each).
# Usage: bash docs/results/run.sh [task ...]   (default: all five); 25-40 min per task on CPU.
# GLP_STRATEGIES=greedy,top runs only those strategies. MRPC, RTE and CoLA were run so first,
# then with all seven, which reused those fine-tunes from the cache in .glp-results.
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_DIR="${GLP_RESULTS_HOME:-.glp-results}"
STRATEGIES="${GLP_STRATEGIES:-greedy,top,bottom,random,exhaustive,block-influence,angular}"
TASKS=("${@:-sst2 mrpc rte cola stsb}")
for task in ${TASKS[@]}; do
  start=$(date +%s)
  case "$task" in
    sst2) limit=2000; length=64; batch=32; lr=1e-4; epochs=1 ;;   # single sentences are short
    stsb) limit=2000; length=128; batch=8; lr=5e-5; epochs=1 ;;  # 1,000: Spearman ~0.2
    cola) limit=2000; length=64; batch=32; lr=1e-4; epochs=3 ;;  # 1 epoch: one class (MCC 0)
    mrpc|rte) limit=1000; length=128; batch=8; lr=1e-4; epochs=1 ;;
    *) echo "unknown task '$task': expected sst2, mrpc, rte, cola or stsb" >&2; exit 2 ;;
  esac
  .venv/bin/glp compare --task "$task" --remove 2 --train-limit "$limit" --epochs "$epochs" --lr "$lr" \
    --batch-size "$batch" --max-length "$length" --seeds 3 --random-orders 2 --home "$HOME_DIR" \
    --strategies "$STRATEGIES"
  report=$(ls -td "$HOME_DIR"/reports/compare-*-"$task"-* | head -1)
  rm -rf "docs/results/$task" && cp -r "$report" "docs/results/$task"
  echo "$task: $(( $(date +%s) - start )) s" | tee -a docs/results/timings.txt
done
