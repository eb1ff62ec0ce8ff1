#!/usr/bin/env bash
# The diffusability regularisers on the CPU, in two parts.
# 1. Fine-tune the demo VAE (runs/demo/vae, from scripts/demo.sh) for 300 batches five times from the same start
#    (plain objective, EQ-VAE, scale equivariance, latent noise, alignment to AlexNet's features): each is
#    `configs/demo-eq.yaml` with the regulariser swapped.
# 2. Train the demo's autoencoder from scratch for 600 batches with and without alignment
#    (`configs/demo-align.yaml`): alignment shapes latents while they form.
# Then export each, evaluate them side by side on Kodak with the latent diagnostics, and measure how well each
# one's latents align with AlexNet's features.
# Usage: bash scripts/diffusability.sh [run names ...]   (default: all seven; the report always has all)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VAEGAN_WEIGHTS_DIR:-}" && -d ../shared/assets/lpips ]]; then
  export VAEGAN_WEIGHTS_DIR=../shared/assets/lpips
fi
[[ -d runs/demo/vae ]] || { echo "runs/demo/vae is missing: run scripts/demo.sh first" >&2; exit 1; }

declare -A RECIPE=(
  [plain]="configs/demo-eq.yaml --model.eq.weight 0"
  [eq]="configs/demo-eq.yaml"
  [se]="configs/demo-eq.yaml --model.eq.weight 0 --model.se.weight 1"
  [noise]="configs/demo-eq.yaml --model.eq.weight 0 --model.noise.weight 1"
  [align]="configs/demo-eq.yaml --model.eq.weight 0 --model.align.weight 0.1 --model.align.backbone alexnet --model.align.lr 1e-2 --model.align.center_features true"
  [scratch-plain]="configs/demo-align.yaml --model.align.weight 0"
  [scratch-align]="configs/demo-align.yaml"
)
ORDER=(plain eq se noise align scratch-plain scratch-align)

train() {
  local name=$1
  rm -rf "runs/demo-$name"
  # shellcheck disable=SC2086  # the config file and its overrides are words
  vaegan fit --config ${RECIPE[$name]} \
    --trainer.logger "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: runs, name: demo-$name}}" \
    --trainer.callbacks "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: runs/demo-$name/checkpoints, save_last: true}}]"
  vaegan export "runs/demo-$name/checkpoints/last.ckpt" "runs/demo-$name/vae" --format diffusers
}

for name in "${@:-${ORDER[@]}}"; do
  train "$name"
done

if [[ ! -d runs/untrained-mini ]]; then
  python -c "import torch, vaegan; torch.manual_seed(0); vaegan.save(vaegan.AutoencoderKL(vaegan.preset('mini')), 'runs/untrained-mini')"
fi
models=(--models+ untrained=runs/untrained-mini --models+ demo=runs/demo/vae)
checkpoints=()
for name in "${ORDER[@]}"; do
  models+=(--models+ "$name=runs/demo-$name/vae")
  checkpoints+=("$name=runs/demo-$name/checkpoints/last.ckpt")
done
vaegan eval "${models[@]}" --data ../shared/assets/kodak --resolution 256 --output reports/diffusability
python scripts/measure_alignment.py --models "${checkpoints[@]}" --backbone alexnet \
  --fit-data ../shared/assets/bsds500/train --data ../shared/assets/kodak | tee reports/diffusability/alignment.txt
