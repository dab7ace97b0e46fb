#!/usr/bin/env bash
# The test command: set-up (idempotent), lint, format check, type check, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m ruff check src tests benchmarks
"$PY" -m ruff format --check src tests benchmarks
"$PY" -m mypy src/diffguide
"$PY" -m pytest -q "$@"
