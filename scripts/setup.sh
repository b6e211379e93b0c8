#!/usr/bin/env bash
# Create .venv and install fedrec with its test tools. torch is pinned to 2.13.0 so that pip
# takes the CPU build that lies on disk here instead of downloading a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
