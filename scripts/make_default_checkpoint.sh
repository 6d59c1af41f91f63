#!/usr/bin/env bash
# Reproduces checkpoints/default on a 2-core CPU: corpus, stage 1, stage 2,
# evaluation, export. The figures in checkpoints/README.md come from this run.
# Usage: bash scripts/make_default_checkpoint.sh [RUNS_DIR]   (after scripts/test.sh made .venv: training needs the [train] extra)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
ponder=".venv/bin/ponder"
$ponder train corpus --out "$runs/corpus" --max-mb 64 --tokenizer-mb 32
$ponder train base --corpus "$runs/corpus" --run-dir "$runs/base" --steps 700 --batch-size 4 --seq-len 1024 \
  --lr 2e-3 --warmup 70 --eval-every 100 --eval-batches 8 --checkpoint-every-s 300 --no-progress
# Stage 2 in eight runs, rows longer than the context seen in attention windows of 1024 (the fast weights carry
# across windows): (1) a TTT layer updating on every chunk, (2) the same on rows of 4096, (3) more of (2) from a
# fresh warm-up, (4) a fresh gate trained with the layer; then, from (4) rounded to bfloat16 (the checkpoint bundled
# until 2026-12-01, which run 5 started from), (5) a lower fast-weight rate, every chunk updating, (6) and (7) more
# of (5) from fresh warm-ups, (8) a fresh gate trained with the TTT layer frozen; then, from (8) rounded to bfloat16
# (bundled until 2026-12-03), (9) a value gate fitted to the layer's measured per-chunk gains and (10) an update
# policy trained by PPO, both with the layer frozen.
common="--corpus $runs/corpus --window 1024 --eval-batches 4 --checkpoint-every-s 240 --no-progress"
$ponder train ttt $common --base "$runs/base/final" --run-dir "$runs/ttt-1-update" --schedule update --chunk 64 \
  --steps 1500 --batch-size 2 --seq-len 2048 --lr 3e-3 --warmup 50 --eval-every 250
$ponder train ttt $common --init-from "$runs/ttt-1-update/final" --run-dir "$runs/ttt-2-update-4096" --schedule update \
  --steps 1000 --batch-size 1 --seq-len 4096 --lr 2e-3 --warmup 30 --eval-every 250
$ponder train ttt $common --init-from "$runs/ttt-2-update-4096/final" --run-dir "$runs/ttt-3-update-4096" \
  --schedule update --steps 1500 --batch-size 1 --seq-len 4096 --lr 1.5e-3 --warmup 30 --eval-every 250
$ponder train ttt $common --init-from "$runs/ttt-3-update-4096/final" --new-gate --run-dir "$runs/ttt-4-gate" \
  --schedule learned --gamma 0.03 --steps 600 --batch-size 2 --seq-len 2048 --lr 1e-3 --warmup 20 --eval-every 200
$ponder export --checkpoint "$runs/ttt-4-gate/final" --out "$runs/ttt-4-gate-bf16" --storage-dtype bfloat16 --overwrite
$ponder train ttt $common --init-from "$runs/ttt-4-gate-bf16" --ttt-base-lr 0.4 --run-dir "$runs/ttt-5-update-lr04" \
  --schedule update --steps 1000 --batch-size 1 --seq-len 4096 --lr 1e-3 --warmup 30 --eval-every 250
$ponder train ttt $common --init-from "$runs/ttt-5-update-lr04/final" --run-dir "$runs/ttt-6-update-lr04" \
  --schedule update --steps 1500 --batch-size 1 --seq-len 4096 --lr 1e-3 --warmup 30 --eval-every 250
$ponder train ttt $common --init-from "$runs/ttt-6-update-lr04/final" --run-dir "$runs/ttt-7-update-lr04" \
  --schedule update --steps 3000 --batch-size 1 --seq-len 4096 --lr 1e-3 --warmup 30 --eval-every 500
$ponder train ttt $common --init-from "$runs/ttt-7-update-lr04/final" --new-gate --gate-only --run-dir "$runs/ttt-8-gate" \
  --schedule learned --gamma 0.03 --steps 600 --batch-size 2 --seq-len 2048 --lr 1e-3 --warmup 20 --eval-every 200
$ponder train plot --run-dir "$runs/base" --out "$runs/base-curves.png"
$ponder export --checkpoint "$runs/ttt-8-gate/final" --out "$runs/ttt-8-gate-bf16" --storage-dtype bfloat16 --overwrite
# Run 9 was started for 300 steps and stopped after 77 (the value loss had stopped falling); --stop-after and a
# --resume that shortens the run to the step reached export exactly that.
gate_args="--init-from $runs/ttt-8-gate-bf16 --corpus $runs/corpus --run-dir $runs/ttt-9-value-gate --batch-size 2 \
  --seq-len 2048 --window 1024 --lr 1e-3 --warmup 20 --eval-every 100 --eval-batches 4 --checkpoint-every-s 240 --no-progress"
$ponder train gate $gate_args --steps 300 --stop-after 77
$ponder train gate $gate_args --steps 77 --resume
$ponder train policy --init-from "$runs/ttt-9-value-gate/final" --corpus "$runs/corpus" --run-dir "$runs/ttt-10-policy" \
  --iterations 30 --batch-size 2 --seq-len 2048 --window 1024 --budget 0.5 --save-every 10
for run in ttt-1-update ttt-2-update-4096 ttt-3-update-4096 ttt-4-gate ttt-5-update-lr04 ttt-6-update-lr04 \
           ttt-7-update-lr04 ttt-8-gate ttt-9-value-gate; do
  $ponder train plot --run-dir "$runs/$run" --out "$runs/$run-curves.png"
done
# Evaluated as bundled (bfloat16 weights, loaded as float32).
$ponder export --checkpoint "$runs/ttt-10-policy/final" --out checkpoints/default --storage-dtype bfloat16 --overwrite
$ponder eval --checkpoint checkpoints/default --corpus "$runs/corpus" --out "$runs/eval" --lines-per-file 0
# The same on a package that no corpus above includes (ponder train corpus leaves it out by default).
$ponder train corpus --out "$runs/heldout-transformers" --root "$(.venv/bin/python -c 'import transformers, os; print(os.path.dirname(transformers.__file__))')" \
  --include-held-out --val-fraction 1 --max-mb 12 --tokenizer "$runs/corpus/tokenizer.json"
$ponder eval --checkpoint checkpoints/default --corpus "$runs/heldout-transformers" --out "$runs/eval-transformers" \
  --lines-per-file 0
