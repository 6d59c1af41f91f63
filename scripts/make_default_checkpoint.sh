#!/usr/bin/env bash
# Reproduces checkpoints/default on a 2-core CPU: corpus, stage 1, stage 2,
# evaluation, export. The figures in checkpoints/README.md come from this run.
# Usage: bash scripts/make_default_checkpoint.sh [RUNS_DIR]   (after scripts/run.sh or test.sh made .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
ponder=".venv/bin/ponder"
$ponder train corpus --out "$runs/corpus" --max-mb 64 --tokenizer-mb 32
$ponder train base --corpus "$runs/corpus" --run-dir "$runs/base" --steps 700 --batch-size 4 --seq-len 1024 \
  --lr 2e-3 --warmup 70 --eval-every 100 --eval-batches 8 --checkpoint-every-s 300 --no-progress
$ponder train ttt --corpus "$runs/corpus" --base "$runs/base/final" --run-dir "$runs/ttt" ${TTT_ARGS:---steps 900 --batch-size 2 --seq-len 1024 --chunk 64 --lr 3e-3 --warmup 30 --eval-every 100 --eval-batches 4 --checkpoint-every-s 240} \
  --no-progress
$ponder train plot --run-dir "$runs/base" --out "$runs/base-curves.png"
$ponder train plot --run-dir "$runs/ttt" --out "$runs/ttt-curves.png"
$ponder eval --checkpoint "$runs/ttt/final" --corpus "$runs/corpus" --out "$runs/eval"
$ponder export --checkpoint "$runs/ttt/final" --out checkpoints/default --storage-dtype bfloat16 --overwrite
