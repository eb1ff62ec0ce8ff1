"""Training checkpoint -> inference VAE, with its latent normalisation measured on real images and a latent preview
map fitted on them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from vaegan.autoencoder.network import AutoencoderKL
from vaegan.autoencoder.normalization import Convention, Kind, LatentNormalization, LatentStatistics, measured_layout
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.formats.card import card_for
from vaegan.formats.checkpoints import read_checkpoint, trained_on
from vaegan.formats.commands import PREVIEW_IMAGES, measure_preview
from vaegan.formats.load import load_checkpoint
from vaegan.formats.save import save
from vaegan.images.readers import measuring_batches


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
    statistics = LatentStatistics()
    for images in measuring_batches(data, resolution, max_images, batch_size):
        latents = vae.encode(images).mode()  # (B, 3, R, R) -> (B, C, h, w)
        statistics.update(measured_layout(latents, kind, vae.config.patch_size))
    if statistics.mean is None:
        raise ValueError(f"no usable images in {data!r} to measure the latent normalisation on")
    normalization = LatentNormalization.fit(statistics, kind, convention, vae.config.patch_size,
                                            vae.config.batch_norm_eps)
    return normalization, statistics


def export(
    checkpoint: str,
    output: str,
    format: Literal["diffusers", "single-file", "pair"] = "diffusers",
    weights: Literal["ema", "model"] = "ema",
    data: str | None = None,
    normalization: Kind | None = None,
    convention: Convention = "shift",
    resolution: int = 256,
    max_images: int = 512,
    measure: bool = True,
    preview: bool = True,
    eval_report: str | None = None,
) -> Path:
    """Write a training checkpoint's inference VAE as safetensors, its normalisation and preview map measured on data.

    Args:
        checkpoint: a vaegan training checkpoint (.ckpt).
        output: output folder (diffusers, with a model card) or .safetensors file (single-file).
        format: a diffusers folder, or one file in the original naming that ComfyUI-style tools load; for a
            distilled tiny autoencoder also "pair", TAESD's encoder and decoder files (a folder holding both).
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
        preview: fit the latent -> RGB map that `vaegan decode --preview` applies instead of the decoder, at the
            normalisation written, on the first 64 images of `data` (for the demo, its seven training photos).
        eval_report: a `vaegan eval` output folder whose results the model card shows.
    """
    if Path(checkpoint).is_dir() or Path(checkpoint).suffix == ".safetensors":
        raise ValueError(f"{checkpoint} is a VAE, not a training checkpoint: `vaegan convert {checkpoint} OUTPUT "
                         "--to diffusers` (or --to single-file) writes it in another format")
    # Read once; a checkpoint cut short by a crash gets that said, not a zip reader's complaint.
    state = read_checkpoint(checkpoint)
    vae = load_checkpoint(state, checkpoint, weights)
    if isinstance(vae, TinyAutoencoder):
        # A distilled student: its latents are its teacher's normalised ones, so there is nothing to measure.
        path = save(vae, output, format=format, card=card_for(vae, output, format))
        print(f"exported the {weights} weights of the student of {vae.config.teacher} to {path}")
        return path
    if format == "pair":
        raise ValueError("--format pair writes a tiny autoencoder's two files; this checkpoint holds a KL autoencoder")
    if data is None:
        data = trained_on(state)
    if measure:
        measured, statistics = measure_normalization(vae, data, resolution, max_images, normalization, convention)
        measured.rounded().apply_to(vae)
        positions = statistics.count  # every latent position adds one value to each channel's statistics
        print(f"measured on {positions} latent positions per channel of {data or 'the demo photos'}: "
              f"z_model = {LatentNormalization.of(vae)}")
    if preview:
        fit = measure_preview(vae, data, resolution, min(max_images, PREVIEW_IMAGES))
        if fit.count < fit.positions_needed:  # a toy run's few small images; real data give thousands
            print(f"no latent preview map: {data or 'the demo training photos'} give {fit.count} latent positions, "
                  f"fewer than the {fit.positions_needed} it needs")
        else:
            vae.latent_preview = fit.solve()
            print(f"latent preview map fitted on {data or 'the demo training photos'}: PSNR "
                  f"{fit.psnr(vae.latent_preview):.2f} dB at the latent resolution")
    path = save(vae, output, format=format, card=card_for(vae, output, format, eval_report))
    print(f"exported {weights} weights to {path}")
    return path
