#!/usr/bin/env bash
# Sets up ponder in ./.venv (idempotent) and serves the bundled default checkpoint:
# HTTP on 127.0.0.1:8080 (OpenAI /v1/completions, llama.cpp /infill), gRPC on :50051.
# Usage: bash scripts/run.sh [ponder serve options, e.g. --host 0.0.0.0 --api-key KEY]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e .
exec .venv/bin/ponder serve "$@"
