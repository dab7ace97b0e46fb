#!/usr/bin/env bash
# Reproduces the walk-through in docs/reproducibility.md (bundled default model, CPU, 1 thread).
set -euo pipefail
work=${1:-/tmp/why-runs-differ}
rm -rf "$work" && mkdir -p "$work" && cd "$work"
DG="python3 -m diffguide.cli.main"
common=(-p "a handwritten digit 3" --seed 42 --steps 20 --cfg 4 --threads 1 --save-latents -q)
$DG generate "${common[@]}" --trace service.trace.safetensors -o service
$DG generate "${common[@]}" --noise comfy --trace workflow.trace.safetensors -o workflow
$DG diff service/diffguide-000-42.safetensors workflow/diffguide-000-42.safetensors || true
$DG diff service.trace.safetensors workflow.trace.safetensors --rtol 1e-4 --atol 1e-4 || true
$DG generate "${common[@]}" --noise comfy -o service-fixed
$DG diff service-fixed/diffguide-000-42.safetensors workflow/diffguide-000-42.safetensors
$DG generate -p "a handwritten digit 3" --seed 42 --steps 20 --cfg 4 --threads 2 --save-latents -q \
  --noise comfy --trace two-threads.trace.safetensors -o two-threads
$DG diff two-threads.trace.safetensors workflow.trace.safetensors || true
$DG replay workflow/diffguide-000-42.png
$DG check-determinism "${common[@]}" -n 4 --batch-vs-single --strict
