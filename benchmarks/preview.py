"""How close each VAE's stored latent preview map comes to the photo and to the VAE's own decode, on held-out images.

For each image (Kodak by default, centre-cropped) the VAE encodes it, and at the latent resolution (everything
averaged over each latent pixel's area) the script scores, in PSNR against the photo and against the decode:

    fitted map        the VAE's stored map (`vaegan export` fits one; `vaegan convert --fit_preview` another)
    grey world        a fixed guess: the mean of the normalised latent channels, as grey
    mean colour       the images' own mean colour everywhere (an oracle: it knows the test set)
    decoder           the decode itself, against the photo: the ceiling of any preview

    python benchmarks/preview.py runs/demo/vae --resolution 512
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import vaegan
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.autoencoder.preview import LatentPreview
from vaegan.images.readers import measuring_batches

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "assets" / "kodak"


def psnrs(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-image PSNR of images (B, 3, h, w) in [-1, 1]."""
    return [10 * math.log10(4.0 / F.mse_loss(x, y).item()) for x, y in zip(a, b, strict=True)]


@torch.inference_mode()
def score(model: str, data: str, resolution: int, max_images: int) -> dict[str, tuple[float, float | None]]:
    """Mean PSNR (against the photo, against the decode) of each candidate of the module doc."""
    vae = vaegan.load(model)
    if vae.latent_preview is None:
        raise SystemExit(f"{model} stores no latent preview map: `vaegan convert --fit_preview` fits one")
    normalization = LatentNormalization.of(vae)
    rows = []
    for images in measuring_batches(data, resolution, max_images, batch_size=4):
        latents = normalization.normalize(vae.encode(images).mode())  # (B, C, h, w)
        decoded = vae.decode(normalization.denormalize(latents)).clamp(-1, 1)  # (B, 3, R, R)
        grid = latents.shape[-2:]
        rows.append((latents, F.adaptive_avg_pool2d(images, grid), F.adaptive_avg_pool2d(decoded, grid)))
    channels = vae.latent_preview.channels
    mean_colour = torch.cat([photo.mean(dim=(2, 3)) for _, photo, _ in rows]).mean(dim=0)
    candidates = {
        "fitted map": vae.latent_preview,
        "grey world": LatentPreview(((1 / channels,) * 3,) * channels, (0.0, 0.0, 0.0)),
        "mean colour": LatentPreview(((0.0,) * 3,) * channels, tuple(mean_colour.tolist())),
    }
    results: dict[str, tuple[float, float | None]] = {}
    for name, preview in candidates.items():
        against_photo = [p for latents, photo, _ in rows for p in psnrs(preview.apply(latents), photo)]
        against_decode = [p for latents, _, decode in rows for p in psnrs(preview.apply(latents), decode)]
        results[name] = (sum(against_photo) / len(against_photo), sum(against_decode) / len(against_decode))
    decoder = [p for _, photo, decode in rows for p in psnrs(decode, photo)]
    results["decoder"] = (sum(decoder) / len(decoder), None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="VAEs with a stored latent preview map.")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="Held-out images: a folder or datasets source.")
    parser.add_argument("--resolution", type=int, default=512, help="Centre-crop side in pixels.")
    parser.add_argument("--max-images", type=int, default=24, help="Images scored (Kodak has 24).")
    args = parser.parse_args()
    for model in args.models:
        results = score(model, args.data, args.resolution, args.max_images)
        print(f"{model}: PSNR (dB) at the latent resolution, {args.data} at {args.resolution}²")
        print(f"  {'':12} {'vs photo':>9} {'vs decode':>10}")
        for name, (photo, decode) in results.items():
            print(f"  {name:12} {photo:9.2f} {'' if decode is None else f'{decode:10.2f}'}")


if __name__ == "__main__":
    main()
