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
# System tools the end-to-end tests drive (Debian packages): promtool checks /metrics, a headless
# Neovim runs the plug-in, headless Chromium renders the λ viewer, nginx routes sessions to replicas,
# Docker builds and runs the image (debootstrap makes its base image where Docker Hub is out of reach),
# bubblewrap sandboxes the HumanEval candidates.
# Without root or apt those tests skip locally; under CI=true they fail instead.
missing=()
for pair in promtool:prometheus nvim:neovim chromium:chromium nginx:nginx curl:curl dockerd:docker.io debootstrap:debootstrap bwrap:bubblewrap; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; } \
    || echo "warning: could not install ${missing[*]}; the tests that need them skip (fail under CI=true)" >&2
fi
# One worker per core, each taking whole files (module fixtures such as a live server stay per file).
exec .venv/bin/python -m pytest -n auto --dist loadfile "$@"
