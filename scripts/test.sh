#!/usr/bin/env bash
# The test command: set-up (idempotent), lint, format check, type check, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash scripts/setup.sh
# setup.sh installs ComfyUI core into vendor/ComfyUI (a failed install only warns). When it is there,
# the ComfyUI parity tests must run: a ComfyUI that does not import fails them instead of skipping.
if [ -d vendor/ComfyUI ]; then
    export DIFFGUIDE_REQUIRE_COMFY="${DIFFGUIDE_REQUIRE_COMFY:-1}"
fi
"$PY" -m ruff check src tests benchmarks training
"$PY" -m ruff format --check src tests benchmarks training
"$PY" -m mypy src/diffguide
"$PY" -m pytest -q "$@"
