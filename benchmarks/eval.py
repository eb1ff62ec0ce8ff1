"""Benchmark vaegan's evaluation metrics against the reference implementations, on the same images in one run.

For N Kodak crops and a distorted copy of each (Gaussian noise, then a slight blur: a stand-in for a
reconstruction), every metric is computed by vaegan and by its reference:

    PSNR     vaegan's psnr             vs skimage.metrics.peak_signal_noise_ratio (one image at a time)
    SSIM     vaegan's ssim             vs skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5)
    MS-SSIM  vaegan's ms_ssim          vs pytorch_msssim.ms_ssim (skipped when not installed)
    LPIPS    vaegan's PerceptualLoss   vs the lpips package's own LPIPS forward (same alex backbone file)

It prints throughput (images/s, median of repeats, the two sides alternated) and the largest per-image
difference between the two values, and writes the table as JSON.

    python benchmarks/eval.py --images 16 --resolution 256 --json bench_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vaegan.images.convert import to_uint8
from vaegan.images.crops import resize_center_crop
from vaegan.images.readers import list_image_files
from vaegan.images.reading import load_image, to_tensor
from vaegan.metrics.reconstruction import ms_ssim, psnr, ssim
from vaegan.pretrained.lpips import PerceptualLoss, backbone_file_name, load_backbone

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "assets" / "kodak"


def load_pairs(folder: Path, count: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 originals and distorted copies (N, 3, R, R), repeating the folder's images if it has fewer."""
    paths = list_image_files(folder)
    if not paths:
        raise SystemExit(f"{folder}: no images (pass --data)")
    crops = [to_tensor(resize_center_crop(load_image(paths[i % len(paths)]), resolution)[0]) for i in range(count)]
    originals = torch.stack(crops)  # (N, 3, R, R) in [-1, 1]
    noise = torch.randn(originals.shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    distorted = TF.gaussian_blur(originals + noise, kernel_size=5, sigma=0.8)
    return to_uint8(originals), to_uint8(distorted)


def reference_lpips(device: str):
    """The lpips package's network with its own v0.1 alex heads and our offline alex backbone file."""
    import lpips
    from safetensors.torch import load_file

    weights_dir = os.environ.get("VAEGAN_WEIGHTS_DIR")
    if not weights_dir:
        raise SystemExit("set VAEGAN_WEIGHTS_DIR to the folder holding alexnet_features.safetensors")
    path = Path(weights_dir) / backbone_file_name("alex")
    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    load_backbone(model.net, load_file(path), source=str(path))
    return model.eval().to(device)


def timed(function: Callable[[], torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    values = function()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: shared Kodak)")
    parser.add_argument("--images", type=int, default=16, help="number of image pairs (default: 16)")
    parser.add_argument("--resolution", type=int, default=256, help="crop side (default: 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per side; the median counts")
    parser.add_argument("--device", default="cpu", help="device for the torch implementations (default: cpu)")
    parser.add_argument("--json", type=Path, default=None, help="write the table here as JSON")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    originals, distorted = load_pairs(args.data, args.images, args.resolution, seed=0)
    x, y = originals.to(args.device), distorted.to(args.device)
    arrays = [(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy()) for a, b in zip(originals, distorted,
                                                                                            strict=True)]
    float_x, float_y = x.float() / 127.5 - 1, y.float() / 127.5 - 1
    ours_lpips = PerceptualLoss("alex").to(args.device)
    theirs_lpips = reference_lpips(args.device)

    def skimage_each(metric: Callable) -> Callable[[], torch.Tensor]:
        return lambda: torch.tensor([metric(a, b) for a, b in arrays], dtype=torch.float64)

    pairs: dict[str, tuple[Callable, Callable | None, str]] = {
        "PSNR": (lambda: psnr(x, y), skimage_each(lambda a, b: peak_signal_noise_ratio(a, b, data_range=255)),
                 "skimage.metrics.peak_signal_noise_ratio"),
        "SSIM": (lambda: ssim(x, y), skimage_each(lambda a, b: structural_similarity(
                     a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, data_range=255)),
                 "skimage.metrics.structural_similarity"),
        "MS-SSIM": (lambda: ms_ssim(x, y), None, "pytorch_msssim.ms_ssim"),
        "LPIPS-alex": (lambda: ours_lpips(float_x, float_y),
                       lambda: theirs_lpips(float_x, float_y).flatten(), "lpips.LPIPS(net='alex')"),
    }
    try:
        import pytorch_msssim

        pairs["MS-SSIM"] = (pairs["MS-SSIM"][0], lambda: pytorch_msssim.ms_ssim(
            x.double(), y.double(), data_range=255, size_average=False), pairs["MS-SSIM"][2])
    except ImportError:
        print("pytorch_msssim is not installed: MS-SSIM has no reference (pip install pytorch-msssim)")

    table = []
    for name, (ours, theirs, reference_name) in pairs.items():
        # Warm-up: first calls pay for allocation and kernel selection.
        ours()
        if theirs is not None:
            theirs()
        ours_times, theirs_times = [], []
        for _ in range(args.repeats):
            seconds, ours_values = timed(ours, args.device)
            ours_times.append(seconds)
            if theirs is not None:
                seconds, theirs_values = timed(theirs, args.device)
                theirs_times.append(seconds)
        row = {
            "metric": name, "reference": reference_name, "images": args.images,
            "ours_images_per_s": args.images / statistics.median(ours_times),
            "reference_images_per_s": args.images / statistics.median(theirs_times) if theirs_times else None,
            "ours_mean": ours_values.double().mean().item(),
            "max_abs_difference": (ours_values.double().cpu() - theirs_values.double().cpu()).abs().max().item()
            if theirs_times else None,
        }
        table.append(row)

    print(f"\n{args.images} Kodak crops at {args.resolution}² vs a noisy, blurred copy; device {args.device}\n")
    print("| metric | ours img/s | reference img/s | speed-up | mean value | max abs diff | reference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in table:
        reference = row["reference_images_per_s"]
        speedup = f"{row['ours_images_per_s'] / reference:.1f}×" if reference else "n/a"
        difference = f"{row['max_abs_difference']:.1e}" if row["max_abs_difference"] is not None else "n/a"
        print(f"| {row['metric']} | {row['ours_images_per_s']:.1f} | "
              f"{f'{reference:.1f}' if reference else 'n/a'} | {speedup} | {row['ours_mean']:.4f} | {difference} | "
              f"`{row['reference']}` |")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "resolution": args.resolution, "rows": table},
                                        indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
