#!/usr/bin/env bash
# The paper's protocol on the embedded MiniLM: the full training set, 3 epochs, lr 2e-5,
# batch 32, max length 128, selection on the selection split, the full dev set, 3 seeds;
# greedy and top at 1 and 2 layers removed, and MLPruning at the matching encoder densities
# (5/6 and 4/6). Several hours per task on 2 CPU cores: run it in the background, and run it
# again after an interruption; glp reuses every finished fine-tune from the run home.
# Each attempt's line ("fine-tunes: N computed, M reused") goes to protocol-log.txt.
# Usage: bash docs/results/protocol.sh [task ...]   (default: mrpc stsb)
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_DIR="${GLP_PROTOCOL_HOME:-.glp-protocol}"
LOG=docs/results/protocol-log.txt
TASKS=("${@:-mrpc stsb}")
mkdir -p "$HOME_DIR"
for task in ${TASKS[@]}; do
  start=$(date +%s)
  echo "$(date -u +%FT%TZ) $task: started" >> "$LOG"
  status=0
  .venv/bin/glp compare --task "$task" --methods greedy,top,mlpruning --remove 2 \
    --density 0.83 --density 0.67 --epochs 3 --lr 2e-5 --batch-size 32 --max-length 128 \
    --seeds 3 --home "$HOME_DIR" > "$HOME_DIR/last-$task.log" 2>&1 || status=$?
  counts=$(grep -o "fine-tunes: [0-9]* computed, [0-9]* reused" "$HOME_DIR/last-$task.log" || true)
  echo "$(date -u +%FT%TZ) $task: exit $status after $(( $(date +%s) - start )) s ${counts}" >> "$LOG"
  [ "$status" -eq 0 ] || exit "$status"
  report=$(ls -td "$HOME_DIR"/reports/compare-*-"$task"-* | head -1)
  rm -rf "docs/results/protocol/$task" && mkdir -p docs/results/protocol
  cp -r "$report" "docs/results/protocol/$task"
done
