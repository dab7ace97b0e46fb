#!/usr/bin/env bash
# Regenerates every output quoted in docs/reproducibility.md (the walk-through "why do two runs
# differ?") and the trace-diff example of the README: bundled default model, CPU, 1 thread.
#
#   bash docs/examples/why-runs-differ.sh [WORKDIR]      # default /tmp/why-runs-differ
#
# Each command is printed as "$ diffguide ..." followed by its output (and its exit code when
# it is not 0); the whole transcript is also written to WORKDIR/transcript.txt. Which quoted
# values depend on the machine (CPU kernels, torch version) is said in docs/reproducibility.md.
# Uses $PYTHON if set, else the python3 on PATH (activate the checkout's .venv first).
set -euo pipefail
PY=${PYTHON:-python3}
work=${1:-/tmp/why-runs-differ}
rm -rf "$work" && mkdir -p "$work" && cd "$work"
export COLUMNS=160

run() {  # print the command as the docs quote it, then run it; report a non-zero exit code
  local shown="" arg
  for arg in "$@"; do
    case "$arg" in *" "*) shown+=" \"$arg\"" ;; *) shown+=" $arg" ;; esac
  done
  echo "\$ diffguide${shown}"
  local code=0
  "$PY" -m diffguide.cli.main "$@" || code=$?
  if [ "$code" != 0 ]; then echo "(exit code $code)"; fi
}

walkthrough() {
  common=(-p "a handwritten digit 3" --seed 42 --steps 20 --cfg 4 --threads 1 --save-latents -q)
  echo "## setup: a 'service' (diffusers policy) and a 'workflow' (ComfyUI policy)"
  run generate "${common[@]}" --trace service.trace.safetensors -o service
  run generate "${common[@]}" --noise comfy --trace workflow.trace.safetensors -o workflow

  echo "## 1. the symptom"
  run diff service/diffguide-000-42.safetensors workflow/diffguide-000-42.safetensors

  echo "## 2. where they part (also the README's trace-diff example)"
  run diff service.trace.safetensors workflow.trace.safetensors --rtol 1e-4 --atol 1e-4

  echo "## 3. why: the manifests"
  "$PY" - <<'EOF'
import json

for name in ("service", "workflow"):
    m = json.load(open(f"{name}/diffguide-000-42.json"))
    noise = {k: m["noise"][k] for k in ("policy", "seeds")}
    sigmas = ", ".join(f"{s:.4f}" for s in m["scheduler"]["sigmas"][:3])
    steps = ", ".join(f"{t:g}" for t in m["scheduler"]["timesteps"][:3])
    print(f"{name:<8}: noise {json.dumps(noise)}")
    print(f"          sigmas [{sigmas}, ...]  timesteps [{steps}, ...]")
EOF

  echo "## 4. the fix, verified"
  run generate "${common[@]}" --noise comfy -o service-fixed
  run diff service-fixed/diffguide-000-42.safetensors workflow/diffguide-000-42.safetensors

  echo "## 5. smaller differences: 2 threads instead of 1"
  run generate -p "a handwritten digit 3" --seed 42 --steps 20 --cfg 4 --threads 2 --save-latents -q \
    --noise comfy --trace two-threads.trace.safetensors -o two-threads
  run diff two-threads.trace.safetensors workflow.trace.safetensors
  run replay workflow/diffguide-000-42.png
  run check-determinism -p "a handwritten digit 3" --seed 42 --steps 20 --cfg 4 --threads 1 \
    -n 4 --batch-vs-single --strict
}

walkthrough 2>&1 | tee transcript.txt
