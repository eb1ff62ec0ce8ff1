#!/usr/bin/env bash
# The diffusability regularisers on the CPU: fine-tune the demo VAE (runs/demo/vae, from scripts/demo.sh) for
# 300 batches five times from the same start (plain objective, EQ-VAE, scale equivariance, latent noise, alignment
# to AlexNet's features), export each, benchmark them side by side on Kodak with the latent diagnostics, and
# measure the alignment cosine. Each fine-tune is `configs/demo-eq.yaml` with the regulariser swapped.
# Usage: bash scripts/diffusability.sh [fine-tune names ...]   (default: all five; the report always has all)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VAEGAN_WEIGHTS_DIR:-}" && -d ../shared/assets/lpips ]]; then
  export VAEGAN_WEIGHTS_DIR=../shared/assets/lpips
fi
[[ -d runs/demo/vae ]] || { echo "runs/demo/vae is missing: run scripts/demo.sh first" >&2; exit 1; }

declare -A REGULARIZER=(
  [plain]="--model.eq_weight 0"
  [eq]=""
  [se]="--model.eq_weight 0 --model.se_weight 1"
  [noise]="--model.eq_weight 0 --model.noise_weight 1"
  [align]="--model.eq_weight 0 --model.align_weight 0.1 --model.align_backbone alexnet --model.align_lr 1e-2"
)
ORDER=(plain eq se noise align)

fine_tune() {
  local name=$1
  rm -rf "runs/demo-$name"
  # shellcheck disable=SC2086  # the options are words
  vaegan fit --config configs/demo-eq.yaml ${REGULARIZER[$name]} \
    --trainer.logger "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: runs, name: demo-$name}}" \
    --trainer.callbacks "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: runs/demo-$name/checkpoints, save_last: true}}]"
  vaegan export "runs/demo-$name/checkpoints/last.ckpt" "runs/demo-$name/vae" --format diffusers
}

for name in "${@:-${ORDER[@]}}"; do
  fine_tune "$name"
done

if [[ ! -d runs/untrained-tiny ]]; then
  python -c "import torch, vaegan; torch.manual_seed(0); vaegan.save(vaegan.AutoencoderKL(vaegan.preset('tiny')), 'runs/untrained-tiny')"
fi
models=(--models+ untrained=runs/untrained-tiny --models+ demo=runs/demo/vae)
for name in "${ORDER[@]}"; do
  models+=(--models+ "$name=runs/demo-$name/vae")
done
vaegan eval "${models[@]}" --data ../shared/assets/kodak --resolution 256 --output reports/diffusability
python scripts/measure_alignment.py --models plain=runs/demo-plain/checkpoints/last.ckpt \
  align=runs/demo-align/checkpoints/last.ckpt --backbone alexnet \
  --fit-data ../shared/assets/bsds500/train --data ../shared/assets/kodak
