"""Training checkpoint -> inference VAE, with its latent normalisation measured on real images."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from vaegan.autoencoder.network import AutoencoderKL
from vaegan.autoencoder.normalization import Convention, Kind, LatentNormalization, LatentStatistics, measured_layout
from vaegan.formats.card import model_card
from vaegan.formats.checkpoints import read_checkpoint, trained_on
from vaegan.formats.load import load_checkpoint
from vaegan.formats.save import save
from vaegan.images.readers import DEMO_VAL_PHOTOS, EvalCrop, load_demo_photos, open_reader
from vaegan.images.reading import ImageError


@torch.inference_mode()
def measure_normalization(
    vae: AutoencoderKL, data: str | None = None, resolution: int = 256, max_images: int = 512,
    kind: Kind | None = None, convention: Convention = "shift", batch_size: int = 8,
) -> tuple[LatentNormalization, LatentStatistics]:
    """The normalisation of `kind` (default: the one the VAE declares) that gives the posterior means of `data`
    unit variance (and zero mean, except the scalar kind's "scale" convention), and the statistics it came from.

    Images are read with the evaluation protocol (shorter side resized, centre crop); `data` is an image folder
    or a `datasets` source, None the held-out demo photos bundled with scikit-image. Unreadable images are
    skipped. Statistics are merged exactly over batches (not averaged per batch).
    """
    kind = kind or LatentNormalization.of(vae).kind
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
            latents = vae.encode(torch.stack(images)).mode()  # (B, 3, R, R) -> (B, C, h, w)
            statistics.update(measured_layout(latents, kind, vae.config.patch_size))
    if statistics.mean is None:
        raise ValueError(f"no usable images in {data!r} to measure the latent normalisation on")
    normalization = LatentNormalization.fit(statistics, kind, convention, vae.config.patch_size,
                                            vae.config.batch_norm_eps)
    return normalization, statistics


def export(
    checkpoint: str,
    output: str,
    format: Literal["diffusers", "single-file"] = "diffusers",
    weights: Literal["ema", "model"] = "ema",
    data: str | None = None,
    normalization: Kind | None = None,
    convention: Convention = "shift",
    resolution: int = 256,
    max_images: int = 512,
    measure: bool = True,
    eval_report: str | None = None,
) -> Path:
    """Write the inference VAE of a training checkpoint as safetensors, its latent normalisation measured on data.

    Args:
        checkpoint: a vaegan training checkpoint (.ckpt).
        output: output folder (diffusers, with a model card) or .safetensors file (single-file).
        format: a diffusers folder, or one file in the original naming that ComfyUI-style tools load.
        weights: the EMA weights (the default), or the raw trained weights.
        data: images to measure the normalisation on: a folder or a datasets source; default: the images the
            checkpoint was trained on (the photos bundled with scikit-image for the demo).
        normalization: scalar (scaling/shift factors), channel (latents_mean/latents_std) or patch (FLUX.2's bn
            statistics); default: what the architecture's pipelines expect.
        convention: for the scalar kind: "shift" (SD3, Flux) gives zero mean and unit std; "scale" (SD, SDXL)
            shift 0, unit std.
        resolution: centre-crop size of the measuring images.
        max_images: images used to measure.
        measure: measure the normalisation; false keeps the checkpoint's.
        eval_report: a `vaegan eval` output folder whose results the model card shows.
    """
    if Path(checkpoint).is_dir() or Path(checkpoint).suffix == ".safetensors":
        raise ValueError(f"{checkpoint} is a VAE, not a training checkpoint: `vaegan convert {checkpoint} OUTPUT "
                         "--to diffusers` (or --to single-file) writes it in another format")
    # Read once; a checkpoint cut short by a crash gets that said, not a zip reader's complaint.
    state = read_checkpoint(checkpoint)
    vae = load_checkpoint(state, checkpoint, weights)
    if measure:
        if data is None:
            data = trained_on(state)
        measured, statistics = measure_normalization(vae, data, resolution, max_images, normalization, convention)
        measured.rounded().apply_to(vae)
        positions = statistics.count // statistics.mean.numel()
        print(f"measured on {positions} latent positions per channel of {data or 'the demo photos'}: "
              f"z_model = {LatentNormalization.of(vae)}")
    card = model_card(vae, Path(output).name, eval_report) if format == "diffusers" else None
    path = save(vae, output, format=format, card=card)
    print(f"exported {weights} weights to {path}")
    return path
