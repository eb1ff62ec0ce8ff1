#!/usr/bin/env bash
# A real interruption, as a user meets one: the demo recipe for 60 batches (validation and a checkpoint every 20
# batches, the discriminator from batch 30), once uninterrupted and once killed with kill -9 a few seconds after
# its batch-40 checkpoint, then resumed with --ckpt_path last. Prints where the killed run stopped and how far
# the two runs' final weights and optimizer states are apart (0 when the resume is exact).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VAEGAN_WEIGHTS_DIR:-}" && -d ../shared/assets/lpips ]]; then
  export VAEGAN_WEIGHTS_DIR=$PWD/../shared/assets/lpips
fi
root=$PWD/runs/check-resume
rm -rf "$root"
mkdir -p "$root/uninterrupted" "$root/killed"
# Every batch's losses in logs/lightning_logs/version_*/metrics.csv, on disk at once: how far the killed run got.
options=(--config "$PWD/configs/demo.yaml" --model.max_batches 60 --model.disc_start 30
         --trainer.val_check_interval 20 --trainer.enable_progress_bar false --trainer.log_every_n_steps 1
         --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir logs
         --trainer.logger.flush_logs_every_n_steps 1)
checkpoint=runs/demo/checkpoints/last.ckpt  # relative to each run's folder
batches() { python -c "import torch, sys; print(int(torch.load(sys.argv[1], weights_only=True)['state_dict']['batches_seen']))" "$1"; }
last_logged() { python -c "import csv, sys; print(max(int(float(r['train/batches'])) for r in csv.DictReader(open(sys.argv[1])) if r['train/batches']))" "$1"; }

(cd "$root/uninterrupted" && vaegan fit "${options[@]}")

cd "$root/killed"
vaegan fit "${options[@]}" &
run=$!
until [[ -f $checkpoint ]] && (( $(batches $checkpoint 2>/dev/null || echo 0) >= 40 )); do sleep 0.2; done
sleep "${KILL_DELAY:-3}"
kill -9 "$run"
wait "$run" || true
echo "killed after batch $(last_logged logs/lightning_logs/version_0/metrics.csv); the last checkpoint is batch $(batches $checkpoint)'s"
vaegan fit "${options[@]}" --ckpt_path last

python - "$root/uninterrupted/$checkpoint" "$root/killed/$checkpoint" <<'EOF'
import sys
import torch

expected, resumed = (torch.load(path, map_location="cpu", weights_only=True) for path in sys.argv[1:])
def tensors(checkpoint):
    states = {f"state_dict.{key}": value for key, value in checkpoint["state_dict"].items()}
    for number, optimizer in enumerate(checkpoint["optimizer_states"]):
        for parameter, state in optimizer["state"].items():
            states |= {f"optimizer{number}.{parameter}.{key}": value for key, value in state.items()}
    return states
a, b = tensors(expected), tensors(resumed)
assert a.keys() == b.keys()
difference = max((a[key].double() - b[key].double()).abs().max().item() for key in a)
print(f"batches: {int(a['state_dict.batches_seen'])} and {int(b['state_dict.batches_seen'])}; "
      f"max abs difference over {len(a)} tensors (weights, EMA, discriminator, optimizer states): {difference:.3g}")
EOF
