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
# System tools the end-to-end tests drive (Debian packages): promtool checks /metrics.
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; } \
    || echo "warning: could not install promtool (Debian's prometheus package); its test will skip" >&2
fi
exec .venv/bin/python -m pytest "$@"
