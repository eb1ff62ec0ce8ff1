#!/usr/bin/env bash
# The embedded demo: train the mini VAE on scikit-image's bundled photos, export it, say where things are.
# Runs offline when VAEGAN_WEIGHTS_DIR holds squeezenet1_1_features.safetensors (../shared/assets/lpips
# beside this checkout); otherwise torchvision downloads the LPIPS backbone once.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VAEGAN_WEIGHTS_DIR:-}" && -d ../shared/assets/lpips ]]; then
  export VAEGAN_WEIGHTS_DIR=../shared/assets/lpips
fi
rm -rf runs/demo
vaegan fit --config configs/demo.yaml "$@"
vaegan export runs/demo/checkpoints/last.ckpt runs/demo/vae --format diffusers
vaegan info runs/demo/vae --size "[256]"
echo
echo "reconstruction grids (input | reconstruction | error x4):"
ls -1 runs/demo/version_*/grids/*.png
echo "metrics per step: $(ls runs/demo/version_*/metrics.csv)"
echo "exported VAE (diffusers AutoencoderKL folder): runs/demo/vae"
