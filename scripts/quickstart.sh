#!/usr/bin/env bash
# Set everything up and run the main job: four images from the bundled default model
# (a tiny SD1.5-architecture model trained by this project on digits and garments),
# with CFG + PAG, saved with their manifests under outputs/quickstart/.
#   bash scripts/quickstart.sh --model tiny-sd3   # the same job on the second bundled model (SD3
#                                                 # architecture, flow matching): outputs/quickstart-tiny-sd3/
# Other arguments go to `diffguide generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash scripts/setup.sh
out=outputs/quickstart
extra=()
prev=""
for arg in "$@"; do
  if [[ "$arg" == "--model=tiny-sd3" || ( "$arg" == "tiny-sd3" && ( "$prev" == "--model" || "$prev" == "-m" ) ) ]]; then
    # its 4 joint blocks have no block 13 (SD3's PAG preset): PAG on joint block b1
    out=outputs/quickstart-tiny-sd3
    extra=(--pag-layers b1)
  fi
  prev="$arg"
done
"$PY" -m diffguide.cli.main generate \
  --prompt "a handwritten digit 7" --prompt "a handwritten digit 3" \
  --prompt "a photo of an ankle boot" --prompt "a photo of a dress" \
  --cfg 4 --pag 1.5 --steps 20 --seed 0 --out "$out" ${extra[@]+"${extra[@]}"} "$@"
