#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench (CPU, Release) from the source
# that the llama-cpp-python sdist on PyPI vendors, for bench/vs_llamacpp.py.
# A benchmark aid, never run by CI. Prints how long the build took.
#
#   bench/setup_llamacpp.sh [DIR]      # DIR defaults to $PONDER_LLAMACPP_DIR or ~/.cache/ponder-llamacpp
#
# Environment: JOBS (make -j, default 2), NICE (default 15), PIP (default .venv/bin/pip).
# Result: DIR/src (the vendored llama.cpp, with convert_hf_to_gguf.py) and
# DIR/build/bin/{llama-server,llama-bench}; DIR/build-seconds holds the build time.
set -euo pipefail
DIR="${1:-${PONDER_LLAMACPP_DIR:-$HOME/.cache/ponder-llamacpp}}"
JOBS="${JOBS:-2}"
NICE="${NICE:-15}"
PIP="${PIP:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/pip}"
mkdir -p "$DIR"
cd "$DIR"
if ! ls llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    "$PIP" download --no-deps --no-binary :all: llama-cpp-python -d .
fi
SDIST="$(ls llama_cpp_python-*.tar.gz | sort -V | tail -n 1)"
if [ ! -d src ]; then
    tar xzf "$SDIST"
    mv "$(basename "$SDIST" .tar.gz)/vendor/llama.cpp" src
    rm -rf "$(basename "$SDIST" .tar.gz)"
fi
echo "llama.cpp from $SDIST ($(cat src/.git-rev 2>/dev/null || true))"
start=$(date +%s)
nice -n "$NICE" cmake -S src -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
nice -n "$NICE" cmake --build build --config Release -j "$JOBS" --target llama-server llama-bench llama-quantize
end=$(date +%s)
echo $((end - start)) > build-seconds
echo "build took $((end - start)) s with -j$JOBS (nice $NICE): $DIR/build/bin"
