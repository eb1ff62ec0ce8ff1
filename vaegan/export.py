"""Training checkpoint -> inference VAE, with its latent normalisation measured on real images."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from vaegan.autoencoder import AutoencoderKL
from vaegan.checkpoints import check_complete
from vaegan.formats import load, save
from vaegan.images import ImageError
from vaegan.metrics import LatentStatistics
from vaegan.normalization import Convention, LatentNormalization
from vaegan.readers import DEMO_VAL_PHOTOS, EvalCrop, load_demo_photos, open_reader


@torch.inference_mode()
def measure_normalization(
    vae: AutoencoderKL, data: str | None = None, resolution: int = 256, max_images: int = 512,
    convention: Convention = "shift", batch_size: int = 8,
) -> tuple[LatentNormalization, LatentStatistics]:
    """The normalisation that gives the posterior means of `data` unit variance (and zero mean for "shift").

    Images are read with the evaluation protocol (shorter side resized, centre crop); `data` is an image folder
    or a `datasets` source, None the held-out demo photos bundled with scikit-image. Unreadable images are
    skipped.
    """
    if data is None:
        reader = load_demo_photos(DEMO_VAL_PHOTOS)
    else:
        reader, _ = open_reader(data, "train", "image", min_size=min(resolution, 64))
    crop = EvalCrop(resolution)
    statistics = LatentStatistics()
    count = min(len(reader), max_images)
    for start in range(0, count, batch_size):
        images = []
        for index in range(start, min(start + batch_size, count)):
            try:
                images.append(crop(reader.read(index)))
            except ImageError:
                continue
        if images:
            statistics.update(vae.encode(torch.stack(images)).mode())  # (B, 3, R, R) -> (B, C, h, w)
    if statistics.mean is None:
        raise ValueError(f"no usable images in {data!r} to measure the latent normalisation on")
    return LatentNormalization.fit(statistics, convention), statistics


def export(
    checkpoint: str,
    output: str,
    format: Literal["diffusers", "single-file"] = "diffusers",
    weights: Literal["ema", "model"] = "ema",
    data: str | None = None,
    convention: Convention = "shift",
    resolution: int = 256,
    max_images: int = 512,
    measure: bool = True,
) -> Path:
    """Write the inference VAE of a training checkpoint as safetensors, its latent normalisation measured on data.

    Args:
        checkpoint: a vaegan training checkpoint (.ckpt).
        output: output folder (diffusers) or .safetensors file (single-file).
        format: a diffusers folder, or one file in the original naming that ComfyUI-style tools load.
        weights: the EMA weights (the default), or the raw trained weights.
        data: images to measure the normalisation on: a folder or a datasets source; default: the photos
            bundled with scikit-image.
        convention: "shift" (SD3, Flux): zero mean and unit std; "scale" (SD, SDXL): shift 0, unit std.
        resolution: centre-crop size of the measuring images.
        max_images: images used to measure.
        measure: measure the normalisation; false keeps the checkpoint's factors.
    """
    check_complete(checkpoint)  # a checkpoint cut short by a crash gets that said, not a zip reader's complaint
    vae = load(checkpoint, weights=weights)
    if measure:
        normalization, statistics = measure_normalization(vae, data, resolution, max_images, convention)
        rounded = LatentNormalization(round(normalization.scaling_factor, 5), round(normalization.shift_factor, 5))
        vae.config = rounded.into(vae.config)
        print(f"measured on {statistics.count // statistics.mean.numel()} latent positions per channel: "
              f"{normalization} ({convention} convention)")
    path = save(vae, output, format=format)
    print(f"exported {weights} weights to {path}")
    return path
