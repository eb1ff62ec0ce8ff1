#!/usr/bin/env bash
# One GPU check, about 8 minutes on one H100-class GPU: every speed claim of the docs measured on CUDA, side by
# side with diffusers (codec) or the plain reference loop (training, dataset encoding), each benchmark writing
# JSON into OUT, then OUT/summary.json and the GPU benchmark page's rows (scripts/gpu_summary.py).
#   bash scripts/gpu_check.sh [OUT]                              on a machine with a CUDA GPU
#   VAEGAN_GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh OUT       every step at toy sizes on the CPU (the tests run
#                                                                this, so that the script cannot rot unnoticed)
# Borrowed GPU time is short and a first run on new hardware can fail anywhere, so each step runs on its own:
# a failing step is logged in OUT/steps.tsv and the next one runs; the steps come in order of what they are worth
# per second, and once VAEGAN_GPU_CHECK_SECONDS (default 480) have passed, the rest are skipped and the summary
# is written from what was measured. VAEGAN_GPU_CHECK_IMAGES is the folder of JPEGs for dataset encoding.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
budget=${VAEGAN_GPU_CHECK_SECONDS:-480}
images=${VAEGAN_GPU_CHECK_IMAGES:-../shared/assets/bsds500/train}
mkdir -p "$out"
rm -f "$out/steps.tsv"
if [[ -z "${VAEGAN_WEIGHTS_DIR:-}" && -d ../shared/assets/lpips ]]; then
  export VAEGAN_WEIGHTS_DIR=../shared/assets/lpips
fi
if [[ "${VAEGAN_GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  # No torch.compile here: inductor on a CPU takes minutes, and CUDA graphs are what it is for. Nor bf16 autocast
  # in training: this CPU emulates bf16 arithmetic slowly, and the smoke run checks the script, not the speed. Nor
  # peak memory, which on a CPU takes a fresh process per row and measures something else than on CUDA.
  memory="" device=cpu arch=mini sizes="32" compiled_sizes="" repeats=1 train_arch=mini train_size=32 train_batch=2
  train_steps=2 train_warmup=1 train_precision=32 encode_images=8 encode_size=64 encode_batch=4 encode_repeats=1
  fallback_size=64 workers=0 profile_size=32
else
  memory=--memory device=cuda arch=sd sizes="256 512 1024" compiled_sizes="512 1024" repeats=5 train_arch=sd
  train_size=256 train_batch=8 train_steps=20 train_warmup=5 train_precision=bf16-mixed encode_images=1000
  encode_size=256 encode_batch=32 encode_repeats=3 fallback_size=512 workers=8 profile_size=512
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device')" ||
    exit 1
fi

started=$SECONDS
failed=()
# step NAME COMMAND...: run COMMAND within what is left of the budget; record its exit status and seconds.
step() {
  local name=$1 left=$((budget - (SECONDS - started))) begin=$SECONDS status
  shift
  if ((left < 20)); then
    echo "== $name: skipped, the ${budget} s budget is spent"
    printf '%s\tskipped\t0\n' "$name" >>"$out/steps.tsv"
    return
  fi
  echo "== $name"
  timeout --kill-after=10 "$left" "$@"
  status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - begin))" >>"$out/steps.tsv"
  ((status == 0)) || failed+=("$name")
}

step device python - "$out/device.json" "$device" <<'PY'
import datetime, json, sys, torch
path, device = sys.argv[1], sys.argv[2]
info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.date.today().isoformat()}
if device == "cuda":
    properties = torch.cuda.get_device_properties(0)
    info |= {"name": properties.name, "memory_gib": properties.total_memory / 2**30,
             "capability": f"{properties.major}.{properties.minor}", "count": torch.cuda.device_count(),
             "cudnn": torch.backends.cudnn.version()}
    # The ceiling this machine reaches in practice: an 8192^3 bf16 matrix product, mean of ten after three.
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    info["bf16_matmul_tflops"] = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12
json.dump(info, open(path, "w"), indent=2)
print(info)
PY

# The two benchmarks that run more than once, with the settings their runs share.
codec=(python benchmarks/codec.py --arch "$arch" --device "$device" --tiled no --repeats "$repeats")
train=(python benchmarks/train.py --device "$device" --arch "$train_arch" --resolution "$train_size"
  --batch-size "$train_batch" --steps "$train_steps" --warmup "$train_warmup" --precision "$train_precision")

step codec-bf16 "${codec[@]}" --dtype bf16 --sizes $sizes $memory --json "$out/codec-bf16.json"
# The same rows with GroupNorm + SiLU in the Triton kernels (vaegan.kernels, opt-in until measured here).
step codec-bf16-kernels env VAEGAN_KERNELS=triton "${codec[@]}" --dtype bf16 --sizes $sizes \
  --json "$out/codec-bf16-kernels.json"
# Where a call's time goes, operator by operator (one call each, untimed), with PyTorch's ops and the kernels.
step profile "${codec[@]}" --dtype bf16 --sizes $profile_size --repeats 1 --profile "$out/profile-bf16.txt"
step profile-kernels env VAEGAN_KERNELS=triton "${codec[@]}" --dtype bf16 --sizes $profile_size --repeats 1 \
  --profile "$out/profile-bf16-kernels.txt"
step train "${train[@]}" --json "$out/train.json"
step train-kernels env VAEGAN_KERNELS=triton "${train[@]}" --json "$out/train-kernels.json"
step codec-fp16 "${codec[@]}" --dtype fp16 --sizes $sizes --json "$out/codec-fp16.json"
step fp16-fallback python scripts/fp16_fallback.py --arch "$arch" --device "$device" --size "$fallback_size" \
  --json "$out/fp16.json"
step encode python benchmarks/encode.py --arch "$arch" --device "$device" --dtype bf16 --images "$images" \
  --max-images "$encode_images" --resolution "$encode_size" --batch-size "$encode_batch" --num-workers "$workers" \
  --decode-jpeg both --repeats "$encode_repeats" --json "$out/encode.json"
# A tiny autoencoder (TAESD's shape) against its teacher (the SD VAE's) and diffusers' AutoencoderTiny.
step tiny python benchmarks/tiny.py --device "$device" --dtype bf16 --sizes $sizes --repeats "$repeats" \
  --json "$out/tiny.json"
# Compiling costs minutes of the budget, so the compiled rows come last, one size per step; on the H200 the
# compiled training took 217 s and each compiled codec size about 100 s.
compiled_codec() {
  step "codec-bf16-compile-$1" "${codec[@]}" --dtype bf16 --sizes "$1" --compile \
    --json "$out/codec-bf16-compile-$1.json"
}
read -ra compiled <<<"$compiled_sizes"
if ((${#compiled[@]})); then
  compiled_codec "${compiled[0]}"
  step train-compile "${train[@]}" --compile --json "$out/train-compile.json"
  for size in "${compiled[@]:1}"; do
    compiled_codec "$size"
  done
fi

python scripts/gpu_summary.py "$out" || failed+=(summary)
if ((${#failed[@]})); then
  echo "gpu_check.sh: failed steps: ${failed[*]} (see $out/steps.tsv and the log above)" >&2
  exit 1
fi
