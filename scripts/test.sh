#!/usr/bin/env bash
# Sets up ./.venv with the test extras (idempotent) and runs the whole test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# torch==2.13.0 is a CPU wheel on the project's machines; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid the CUDA build.
.venv/bin/pip install --quiet -e '.[test]'
exec .venv/bin/python -m pytest "$@"
