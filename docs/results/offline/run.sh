#!/usr/bin/env bash
# Reproduces docs/results/offline/: SVD, Fisher-weighted SVD and the autoencoder (linear and
# non-linear decoders) at compression ratios 10, 4 and 20, per module type and for all six
# encoder types together, with no fine-tuning of the compressed models.
# Teachers: the embedded MiniLM fine-tuned by glp on SST-2 (2,000 training examples, 1 epoch,
# lr 1e-4, max length 64, seed 40; the unpruned reference of docs/results/mlpruning) and on
# STS-B (3,000 examples, 2 epochs, lr 1e-4, max length 64, seed 40).
# The autoencoder: the reference's settings (20 epochs, batches of 16 rows, Adam 1e-3), with
# the selection-split metric evaluated every 5 epochs (--eval-every 5) to fit a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=docs/results/offline
start=$(date +%s)
.venv/bin/glp prune --strategy top --remove 1 --task sst2 --train-limit 2000 --epochs 1 \
  --max-length 64 --lr 1e-4 --seeds 1 --home .glp-results-offline/sst2 --no-register
.venv/bin/glp prune --strategy top --remove 1 --task stsb --train-limit 3000 --epochs 2 \
  --max-length 64 --lr 1e-4 --seeds 1 --home .glp-results-offline/stsb --no-register
teacher() {  # the unpruned seed-40 model of a home
  .venv/bin/python -c "import pyarrow.dataset as ds, sys; rows = ds.dataset(sys.argv[1] + '/parquet/finals').to_table().to_pylist(); print(next(r['model_dir'] for r in rows if r['method'] == 'unpruned' and r['seed'] == 40))" "$1"
}
PYTHONPATH=. .venv/bin/python benchmarks/offline_compression.py "$(teacher .glp-results-offline/sst2)" \
  --task sst2 --train-limit 2000 --max-length 64 --eval-every 5 --latency \
  --home .glp-results-offline/bench-sst2 --out $OUT/sst2.jsonl
PYTHONPATH=. .venv/bin/python benchmarks/offline_compression.py "$(teacher .glp-results-offline/stsb)" \
  --task stsb --train-limit 3000 --max-length 64 --eval-every 5 --latency \
  --home .glp-results-offline/bench-stsb --out $OUT/stsb.jsonl
.venv/bin/python $OUT/table.py $OUT/sst2.jsonl $OUT/stsb.jsonl | tee $OUT/table.md
echo "offline results: $(( $(date +%s) - start )) s" | tee -a $OUT/timings.txt
