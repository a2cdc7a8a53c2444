#!/usr/bin/env bash
# Reproduces docs/results/methods/: every method on the embedded MiniLM, one task at a time,
# at the budgets of docs/results (README.md there says why each), 3 seeds, 2 of 6 layers:
# glp compare --methods (layer strategies, MLPruning, low-rank, compositions), then
# glp prune --distill at the same budget (it reuses the comparison's search and finals).
# Usage: bash docs/results/methods/run.sh [task ...]   (default: sst2)
# GLP_METHODS overrides the methods. GRAIN trains 3 epochs (--pruning-epochs grain=3; its
# reference 20 would take about 2 hours per task here), as in docs/results/grain.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HOME_DIR="${GLP_RESULTS_HOME:-.glp-methods}"
METHODS="${GLP_METHODS:-greedy,top,mlpruning,grain,post-training,lowrank,autoencoder,greedy+lowrank,greedy+mlpruning}"
TASKS=("${@:-sst2}")
for task in ${TASKS[@]}; do
  start=$(date +%s)
  case "$task" in
    sst2) limit=2000; length=64; batch=32; lr=1e-4; epochs=1 ;;
    stsb) limit=2000; length=64; batch=32; lr=1e-4; epochs=2 ;;   # probe: Spearman 0.776
    cola) limit=4000; length=64; batch=32; lr=1e-4; epochs=3 ;;   # probe: MCC 0.2518
    *) echo "unknown task '$task': expected sst2, stsb or cola" >&2; exit 2 ;;
  esac
  common=(--task "$task" --train-limit "$limit" --epochs "$epochs" --lr "$lr"
          --batch-size "$batch" --max-length "$length" --seeds 3 --home "$HOME_DIR")
  budget=("${common[@]}" --remove 2)
  grain=(); case ",$METHODS," in *,grain,*) grain=(--pruning-epochs grain=3) ;; esac
  pt=(); case ",$METHODS," in *post-training*) pt=(--constraint 0.6 --constraint 0.4) ;; esac
  .venv/bin/glp compare "${budget[@]}" --methods "$METHODS" --density 0.5 --density 0.3 \
    --ratio 2 --ratio 4 "${pt[@]}" "${grain[@]}"
  report=$(ls -td "$HOME_DIR"/reports/compare-*-"$task"-* | head -1)
  rm -rf "docs/results/methods/$task" && mkdir -p "docs/results/methods/$task"
  cp "$report"/methods.* "$report"/pareto_*.png "docs/results/methods/$task/"
  case ",$METHODS," in *,autoencoder,*)  # the no-retraining protocol beside the paper's
    .venv/bin/glp compress "${common[@]}" --method autoencoder --ratio 2 --ratio 4 \
      --ae-finetune-epochs 0 --no-register | tee "docs/results/methods/$task/autoencoder-offline.txt" ;;
  esac
  .venv/bin/glp prune "${budget[@]}" --distill --no-register
  PYTHONPATH=. .venv/bin/python docs/results/methods/distill.py "$HOME_DIR" "$task" \
    > "docs/results/methods/$task/distill.md"
  echo "$task: $(( $(date +%s) - start )) s" | tee -a docs/results/methods/timings.txt
done
