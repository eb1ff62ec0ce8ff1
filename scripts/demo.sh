#!/usr/bin/env bash
# The embedded demo: train the mini VAE on scikit-image's bundled photos, export it, say where things are.
# Runs offline when VAEGAN_WEIGHTS_DIR holds squeezenet1_1_features.safetensors (../shared/assets/lpips
# beside this checkout); otherwise torchvision downloads the LPIPS backbone once.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VAEGAN_WEIGHTS_DIR:-}" && -d ../shared/assets/lpips ]]; then
  export VAEGAN_WEIGHTS_DIR=../shared/assets/lpips
fi
if [[ -d runs/demo ]]; then
  echo "removing the previous demo run, runs/demo (keep it by moving it elsewhere first)"
  rm -rf runs/demo
fi
vaegan fit --config configs/demo.yaml "$@"
vaegan export runs/demo/checkpoints/last.ckpt runs/demo/vae --format diffusers
vaegan info runs/demo/vae --size "[256]"
echo
echo "reconstruction grids (input | reconstruction | error x4):"
ls -1 runs/demo/version_*/grids/*.png
echo "metrics per step:      $(ls runs/demo/version_*/metrics.csv)"
echo "training checkpoints:  runs/demo/checkpoints (last.ckpt resumes with --ckpt_path last)"
echo "Weights & Biases run:  $(ls -d runs/wandb/offline-run-* 2>/dev/null | tail -n 1 || true)" \
     "(offline unless you are logged in; 'wandb sync' uploads it)"
echo "exported VAE:          runs/demo/vae (a diffusers AutoencoderKL folder)"
