"""Training checkpoint -> inference VAE, with scaling and shift factors measured on real images."""

from __future__ import annotations

from pathlib import Path

import torch

from vaegan.autoencoder import AutoencoderKL
from vaegan.data import ImageDataModule
from vaegan.formats import load
from vaegan.metrics import LatentStatistics


@torch.inference_mode()
def measure_factors(
    vae: AutoencoderKL, data: str | None = None, resolution: int = 256, max_images: int = 512,
    convention: str = "shift", batch_size: int = 8,
) -> tuple[float, float, LatentStatistics]:
    """(scaling_factor, shift_factor) that give the posterior means of `data` zero mean and unit std.

    Images are read with the evaluation protocol (shorter side resized, centre crop); `data` is anything
    `ImageDataModule` reads, None being the photos bundled with scikit-image (the held-out demo photos).
    """
    images = ImageDataModule(
        source=data, val_source=data, resolution=resolution, batch_size=batch_size, num_workers=0,
        val_count=max_images, min_size=min(resolution, 64),
    )
    images.setup("validate")
    statistics = LatentStatistics()
    for batch in images.val_dataloader():
        statistics.update(vae.encode(batch["image"]).mode())
    if statistics.mean is None:
        raise ValueError(f"no usable images in {data!r} to measure the latent factors on")
    scale, shift = statistics.suggested_factors(convention)
    return scale, shift, statistics


def export(
    checkpoint: str | Path, output: str | Path, format: str = "diffusers", weights: str = "ema",
    data: str | None = None, convention: str = "shift", resolution: int = 256, max_images: int = 512,
    measure: bool = True,
) -> Path:
    """Write the inference artifact of a training checkpoint (EMA weights by default) as safetensors."""
    vae = load(checkpoint, weights=weights)
    if measure:
        scale, shift, statistics = measure_factors(vae, data, resolution, max_images, convention)
        vae.config = vae.config.replace(scaling_factor=round(scale, 5), shift_factor=round(shift, 5))
        print(f"measured on {statistics.count // statistics.mean.numel()} latent positions per channel: "
              f"scaling_factor {scale:.5f}, shift_factor {shift:.5f} ({convention} convention)")
    return vae.save(output, format=format)
