#!/usr/bin/env bash
# One GPU check, about 8 minutes on one H100-class GPU: every speed claim of the README measured on CUDA, side by
# side with diffusers (codec) or the plain reference loop (training, dataset encoding), each benchmark writing
# JSON into OUT, then OUT/summary.json and the README's rows (scripts/gpu_summary.py).
#   bash scripts/gpu_check.sh [OUT]                              on a machine with a CUDA GPU
#   VAEGAN_GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh OUT       every step at toy sizes on the CPU (the tests run
#                                                                this, so that the script cannot rot unnoticed)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/gpu}
mkdir -p "$out"
if [[ -z "${VAEGAN_WEIGHTS_DIR:-}" && -d ../shared/assets/lpips ]]; then
  export VAEGAN_WEIGHTS_DIR=../shared/assets/lpips
fi
if [[ "${VAEGAN_GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  # No torch.compile here: inductor on a CPU takes minutes, and CUDA graphs are what it is for. Nor bf16 autocast
  # in training: this CPU emulates bf16 arithmetic slowly, and the smoke run checks the script, not the speed.
  device=cpu arch=tiny sizes="32" compiled_sizes="" compile="" repeats=1 train_arch=tiny train_size=32
  train_batch=2 train_steps=2 train_precision=32 encode_images=8 encode_size=64 encode_batch=4
  fallback_size=64 workers=0
else
  device=cuda arch=sd sizes="256 512 1024" compiled_sizes="512 1024" compile="--compile" repeats=5 train_arch=sd
  train_size=256 train_batch=8 train_steps=20 train_precision=bf16-mixed encode_images=200 encode_size=256
  encode_batch=32 fallback_size=512 workers=8
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device')"
fi

python - "$out/device.json" "$device" <<'PY'
import datetime, json, sys, torch
path, device = sys.argv[1], sys.argv[2]
info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.date.today().isoformat()}
if device == "cuda":
    properties = torch.cuda.get_device_properties(0)
    info |= {"name": properties.name, "memory_gib": properties.total_memory / 2**30,
             "capability": f"{properties.major}.{properties.minor}", "count": torch.cuda.device_count()}
json.dump(info, open(path, "w"), indent=2)
print(info)
PY

echo "== codec: vaegan vs diffusers, same weights, alternated rounds"
python scripts/benchmark_codec.py --arch "$arch" --device "$device" --dtype bf16 --sizes $sizes --tiled no \
  --repeats "$repeats" --memory --json "$out/codec-bf16.json"
python scripts/benchmark_codec.py --arch "$arch" --device "$device" --dtype fp16 --sizes $sizes --tiled no \
  --repeats "$repeats" --json "$out/codec-fp16.json"
for dtype in bf16 fp16; do
  [[ -n "$compiled_sizes" ]] || break
  python scripts/benchmark_codec.py --arch "$arch" --device "$device" --dtype "$dtype" --sizes $compiled_sizes \
    --tiled no --repeats "$repeats" --compile --json "$out/codec-$dtype-compile.json"
done

echo "== fp16 on a VAE that overflows"
python scripts/fp16_fallback.py --arch "$arch" --device "$device" --size "$fallback_size" --json "$out/fp16.json"

echo "== training: the VAEGAN module in bf16-mixed with compile vs the plain fp32 reference loop"
python scripts/benchmark_train.py --device "$device" --arch "$train_arch" --resolution "$train_size" \
  --batch-size "$train_batch" --steps "$train_steps" --precision "$train_precision" $compile --channels-last \
  --json "$out/train.json"

echo "== dataset encoding: vaegan encode (JPEGs decoded by its workers, and on the device) vs a plain diffusers loop"
python scripts/benchmark_encode.py --arch "$arch" --device "$device" --dtype bf16 --max-images "$encode_images" \
  --resolution "$encode_size" --batch-size "$encode_batch" --num-workers "$workers" --decode-jpeg both \
  --json "$out/encode.json"

python scripts/gpu_summary.py "$out"
