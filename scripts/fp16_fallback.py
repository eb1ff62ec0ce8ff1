"""Decode in fp16 with a VAE that overflows, through vaegan's Codec: every chunk that overflows is redone in
fp32, so the images stay finite. The SD and SDXL decoders exceed fp16's range (65504) on some images, the
origin of the "fp16-fix" VAE; here the overflow is forced by scaling the first decoder conv of a random SD-shaped
VAE. Prints and writes JSON: whether plain fp16 overflows, whether the codec's output is finite, its largest
difference from the fp32 decode, and the time per call against fp16 on the same VAE unscaled and bf16.

    python scripts/fp16_fallback.py --device cuda --json fp16.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch

from vaegan import AutoencoderKL, Codec, preset
from vaegan.autoencoder.normalization import LatentNormalization


def timed(codec: Codec, latents: torch.Tensor, repeats: int) -> tuple[torch.Tensor, float]:
    """The decode and the median seconds of `repeats` calls after one warm-up."""
    images, seconds = codec.decode(latents), []
    for _ in range(repeats):
        if latents.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        images = codec.decode(latents)
        if latents.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return images, sorted(seconds)[len(seconds) // 2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd", help="the VAE preset (random weights)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (median taken)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    normal = AutoencoderKL(preset(args.arch)).eval()
    overflowing = copy.deepcopy(normal)
    with torch.no_grad():
        overflowing.decoder.conv_in.weight.mul_(1e5)  # the residual stream then peaks far above 65504
    side = args.size // normal.config.downsampling_factor
    latents = torch.randn(1, normal.config.latent_channels, side, side, device=args.device)

    with torch.no_grad():
        plain = copy.deepcopy(overflowing).to(args.device, torch.float16)
        z = LatentNormalization.of(overflowing).denormalize(latents).half()
        plain_fp16_finite = bool(torch.isfinite(plain.decode(z)).all())
    reference, fp32_seconds = timed(Codec(copy.deepcopy(overflowing), args.device), latents, args.repeats)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guarded, fallback_seconds = timed(Codec(copy.deepcopy(overflowing), args.device, "fp16"), latents, args.repeats)
    _, fp16_seconds = timed(Codec(copy.deepcopy(normal), args.device, "fp16"), latents, args.repeats)
    _, bf16_seconds = timed(Codec(copy.deepcopy(normal), args.device, "bf16"), latents, args.repeats)
    result = {
        "arch": args.arch, "size": args.size, "device": args.device,
        "plain_fp16_finite": plain_fp16_finite,
        "codec_fp16_finite": bool(torch.isfinite(guarded).all()),
        "warned": any("fp16 overflowed" in str(warning.message) for warning in caught),
        "max_abs_diff_vs_fp32": (guarded - reference).abs().max().item(),
        "seconds": {"fp32": fp32_seconds, "fp16_with_fallback": fallback_seconds, "fp16": fp16_seconds,
                    "bf16": bf16_seconds},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main()
