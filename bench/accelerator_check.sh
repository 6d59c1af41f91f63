#!/usr/bin/env bash
# Checks ponder on whatever JAX device this machine has (GPU, TPU or CPU) and measures it.
#
#   bash bench/accelerator_check.sh [cuda12|tpu|cpu] [OUT_DIR]
#
# 1. Installs ponder with the test extras and JAX's build for the device (into $VENV, default ./.venv-accel).
# 2. Says which device JAX runs on; with cuda12 or tpu it stops if that is still the CPU.
# 3. The parity tests: logits against Hugging Face GPT-2, TTT dual form against the primal,
#    cached decoding against the full forward, bf16/int8 weights, sharded training against
#    one device, the engine's served tokens against offline generation.
# 4. bench/decode.py (tiny and the GPT-2 124M shape), bench/ttt_overhead.py, bench/weights.py
#    (float32 / bfloat16 / int8 weights, TTT off), each writing JSON into OUT_DIR.
# 5. A short served load: `ponder serve` on the bundled checkpoint, bench/serve_load.py in
#    throughput mode, 1 and 4 streams.
# Everything is written under OUT_DIR (default runs/accelerator-<backend>); bench/README.md
# "On an accelerator" records a run. Nothing in CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-cuda12}
case "$target" in cuda12 | tpu) extra=",$target" ;; cpu) extra="" ;; *) echo "usage: $0 [cuda12|tpu|cpu] [OUT_DIR]" >&2; exit 2 ;; esac
venv=${VENV:-.venv-accel}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -e ".[test$extra]"
py="$venv/bin/python"

backend=$("$py" -c 'import jax; print(jax.default_backend())')
out=${2:-runs/accelerator-$backend}
mkdir -p "$out"
"$py" -c 'import jax; print(jax.__version__, jax.devices())' | tee "$out/devices.txt"
if [ "$target" != cpu ] && [ "$backend" = cpu ]; then
  echo "JAX found no $target device (it runs on the CPU); see $out/devices.txt" >&2
  exit 1
fi

step() { echo; echo "== $*"; }
step "parity tests"
"$py" -m pytest -q -p no:cacheprovider \
  tests/test_gpt2_parity.py tests/test_ttt.py tests/test_decode.py tests/test_ttt_lm.py tests/test_quantize.py \
  tests/test_sharding.py tests/test_engine.py 2>&1 | tee "$out/parity.txt"

cd bench
step "decode.py, tiny and the 124M shape"
"../$py" decode.py --preset tiny --json "../$out/decode-tiny.json"
"../$py" decode.py --preset gpt2 --new-tokens 64 --prefill-tokens 512 --json "../$out/decode-124M.json"
step "ttt_overhead.py"
"../$py" ttt_overhead.py --kinds inplace,lora --json "../$out/ttt_overhead.json"
step "weights.py, the bundled checkpoint and the 124M shape"
"../$py" weights.py --checkpoint ../checkpoints/default --speed-only --json "../$out/weights-tiny.json"
ck=$(mktemp -d)
trap 'rm -rf "$ck"; kill "${server:-0}" 2>/dev/null || true' EXIT
"../$venv/bin/ponder" init --out "$ck/gpt2" --preset gpt2 --vocab-size 8192 --corpus-mb 5 --overwrite
"../$py" weights.py --checkpoint "$ck/gpt2" --speed-only --new-tokens 64 --json "../$out/weights-124M.json"
cd ..

step "served load, bundled checkpoint, 1 and 4 streams"
"$venv/bin/ponder" serve --port 18080 --grpc-port 0 --compile-cache "" >"$out/serve.log" 2>&1 &
server=$!
"$py" bench/serve_load.py --url http://127.0.0.1:18080 --mode throughput --concurrency 4 --rounds 2 \
  --prompt-tokens 440 --max-tokens 128 --json "$out/serve_load.json"
kill "$server"
wait "$server" || true
echo; echo "results in $out"
