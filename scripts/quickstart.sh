#!/usr/bin/env bash
# Set everything up and run the main job: four images from the bundled default model
# (a tiny SD1.5-architecture model trained by this project on digits and garments),
# with CFG + PAG, saved with their manifests under outputs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash scripts/setup.sh
"$PY" -m diffguide.cli.main generate \
  --prompt "a handwritten digit 7" --prompt "a handwritten digit 3" \
  --prompt "a photo of an ankle boot" --prompt "a photo of a dress" \
  --cfg 4 --pag 1.5 --steps 20 --seed 0 --out outputs/quickstart "$@"
