"""`vaegan convert` and `vaegan info`: a VAE in any format vaegan reads, written as another (with a latent preview
map fitted on images, if asked) or described."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from vaegan.autoencoder.network import AutoencoderKL
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.autoencoder.preview import LatentPreview, LatentPreviewFit
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.formats.card import card_for
from vaegan.formats.checkpoints import CheckpointError, read_checkpoint
from vaegan.formats.load import load
from vaegan.formats.naming import METADATA_KEY
from vaegan.formats.save import save
from vaegan.images.readers import DEMO_TRAIN_PHOTOS, measuring_batches
from vaegan.utils.dtypes import resolve_dtype

# A preview map has (C + 1) x 3 unknowns: 64 crops give thousands of latent positions for each.
PREVIEW_IMAGES = 64
PREVIEW_RESOLUTION = 256
# `vaegan info` lists a preview map's rows up to this many latent channels (FLUX.2's 128 only in its JSON).
LISTED_PREVIEW_CHANNELS = 16


@torch.inference_mode()
def measure_preview(
    vae: AutoencoderKL, data: str | None, resolution: int = PREVIEW_RESOLUTION, max_images: int = PREVIEW_IMAGES,
    batch_size: int = 8,
) -> LatentPreviewFit:
    """The least-squares fit of `vae`'s latent preview map (`vaegan.autoencoder.preview`) to the posterior means of
    `data`'s images (`measuring_batches`), normalised as the VAE declares: `solve()` gives the map once they give
    `positions_needed` latent positions."""
    normalization = LatentNormalization.of(vae)
    fit = LatentPreviewFit()
    # Without data, the demo's seven training photos: the two held-out ones hold too few colours for a map that
    # carries over to other photos.
    for images in measuring_batches(data, resolution, max_images, batch_size, demo_photos=DEMO_TRAIN_PHOTOS):
        fit.update(normalization.normalize(vae.encode(images).mode()), images)  # (B, C, h, w), (B, 3, R, R)
    return fit


def convert(
    source: str,
    destination: str,
    *,
    to: Literal["diffusers", "single-file", "pair"],
    dtype: Literal["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"] | None = None,
    preset: str | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    eval_report: str | None = None,
    fit_preview: str | None = None,
) -> Path:
    """Convert any VAE vaegan reads to a diffusers folder (with a model card) or a single file.

    Args:
        source: a diffusers folder, single file, training checkpoint, or a hub name owner/name.
        destination: output folder (diffusers) or .safetensors file (single-file).
        to: output format; "pair" writes a tiny autoencoder as TAESD's two files (in a folder).
        dtype: store the weights in this precision (fp32, bf16, fp16, as every command spells it; the long
            names float32, bfloat16, float16 are read too); default: as loaded (fp32).
        preset: architecture preset (sd, sdxl, sd3, flux, flux2, mini) for files that carry no config.
        scaling_factor: override the scaling factor.
        shift_factor: override the shift factor.
        subfolder: the folder of the source (or hub repository) that holds the VAE; default: the root, then vae/.
        revision: of a hub name: branch, tag or commit.
        eval_report: a `vaegan eval` output folder whose results the model card shows.
        fit_preview: images (a folder or a datasets source) to fit the latent preview map on that `vaegan decode
            --preview` applies, replacing any the source has: the first 64, centre-cropped to 256 pixels.
    """
    vae = load(source, config=preset, scaling_factor=scaling_factor, shift_factor=shift_factor,
               subfolder=subfolder, revision=revision)
    if fit_preview is not None:
        if isinstance(vae, TinyAutoencoder):
            raise ValueError(f"--fit_preview: {source} is a tiny autoencoder, which stores no latent preview map; "
                             "fit one for its teacher")
        fit = measure_preview(vae, fit_preview)
        if fit.count < fit.positions_needed:
            raise ValueError(f"--fit_preview {fit_preview}: its images give {fit.count} latent positions, fewer than "
                             f"the {fit.positions_needed} this VAE's latent preview map needs; give more images")
        vae.latent_preview = fit.solve()
        print(f"fitted a latent preview map on {fit_preview}: PSNR {fit.psnr(vae.latent_preview):.2f} dB at the "
              "latent resolution")
    card = card_for(vae, destination, to, eval_report)
    path = save(vae, destination, format=to, dtype=resolve_dtype(dtype) if dtype else None, card=card)
    print(f"wrote {to} VAE to {path}")
    return path


def info(
    path: str,
    size: tuple[int, ...] = (512,),
    format: Literal["text", "json"] = "text",
    preset: str | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
) -> dict:
    """Describe a VAE: architecture, parameters, latent shape and normalisation.

    Args:
        path: any VAE vaegan reads, or a hub name owner/name.
        size: image size for the latent shape: one side, or height and width (e.g. '[512, 768]').
        format: text for people, or JSON.
        preset: architecture preset (sd, sdxl, sd3, flux, flux2, mini) for files that carry no config.
        scaling_factor: override the scaling factor.
        shift_factor: override the shift factor.
        subfolder: the folder of the path (or hub repository) that holds the VAE; default: the root, then vae/.
        revision: of a hub name: branch, tag or commit.
    """
    vae = load(path, config=preset, scaling_factor=scaling_factor, shift_factor=shift_factor, subfolder=subfolder,
               revision=revision)
    height, width = (tuple(size) * 2)[:2]
    summary = vae_summary(vae, height, width)
    # A training checkpoint holds the preset's factors: export measures the real ones on the training images.
    summary["normalization_measured"] = not is_training_checkpoint(path)
    if format == "json":
        print(json.dumps(summary, indent=2))
        return summary
    config = summary["architecture"]
    print(f"{path}")
    print(f"  parameters        {summary['parameters']:,} (encoder {summary['encoder_parameters']:,}, "
          f"decoder {summary['decoder_parameters']:,})")
    if isinstance(vae, TinyAutoencoder):
        pool = ", pool branch (TAEF2)" if config["midblock_pool"] else ""
        print(f"  tiny autoencoder  encoder widths {config['encoder_block_out_channels']}, decoder widths "
              f"{config['decoder_block_out_channels']}, TAESD's Conv+ReLU blocks{pool}; teacher "
              f"{config['teacher'] or 'unrecorded'}")
        print(f"  latent            {config['latent_channels']} channels, f{summary['downsampling_factor']}, "
              "already in its teacher's normalised space")
        print(f"  {height}x{width} image -> latent {tuple(summary['latent_shape'])}")
        folded = ", folded into 2x2 patches as FLUX.2's pipelines read them" if config["patch_size"] else ""
        print(f"  normalisation     none of its own{folded} -> {tuple(summary['normalized_latent_shape'])}")
        return summary
    print(f"  widths            {config['block_out_channels']}, {config['layers_per_block']} resnets per level, "
          f"GroupNorm({config['norm_num_groups']}), mid attention {config['mid_block_add_attention']}")
    print(f"  latent            {config['latent_channels']} channels, f{summary['downsampling_factor']}, "
          f"quant convs {config['use_quant_conv']}/{config['use_post_quant_conv']}")
    print(f"  {height}x{width} image -> latent {tuple(summary['latent_shape'])} "
          f"({summary['compression']}x fewer values)")
    print(f"  normalisation     z_model = {summary['normalization_formula']} -> "
          f"{tuple(summary['normalized_latent_shape'])}")
    if not summary["normalization_measured"]:
        print("                    (the preset's factors: `vaegan export` measures them on the training images)")
    print_preview(vae.latent_preview, path)
    return summary


def print_preview(preview: LatentPreview | None, path: str) -> None:
    """`vaegan info`'s lines on the latent preview map: its factors (R, G, B per channel) and bias, or how to get
    one."""
    if preview is None:
        print(f"  latent preview    none stored: `vaegan convert {path} OUTPUT --fit_preview IMAGES` fits one "
              "(`vaegan export` always does)")
        return
    if preview.channels > LISTED_PREVIEW_CHANNELS:
        print(f"  latent preview    rgb = latents x {preview.channels}x3 factors + bias (--format json lists "
              "them), for `vaegan decode --preview`")
        return
    print("  latent preview    rgb = latents x factors + bias, for `vaegan decode --preview`:")
    for name, row in [*((f"channel {c}", row) for c, row in enumerate(preview.factors)), ("bias", preview.bias)]:
        print(f"    {name:<14}  " + " ".join(f"{value:+.4f}" for value in row))


def is_training_checkpoint(path: str) -> bool:
    """Whether `path` is a vaegan training checkpoint (not yet exported)."""
    file = Path(path)
    if not file.is_file() or file.suffix not in (".ckpt", ".pt", ".pth"):
        return False
    try:
        return METADATA_KEY in read_checkpoint(file)
    except CheckpointError:  # a torch file of the old, non-zip kind: not one of our checkpoints
        return False


def vae_summary(vae, height: int, width: int) -> dict:
    """What a user wants to know about a VAE before using it."""
    config = vae.config
    f = config.downsampling_factor
    latent = (config.latent_channels, height // f, width // f)
    normalization = LatentNormalization.of(vae)
    patch = normalization.spatial_factor
    return {
        "architecture": config.to_dict(),
        "parameters": vae.num_parameters(),
        # A tiny autoencoder's file pair may hold only one of them.
        "encoder_parameters": sum(p.numel() for p in vae.encoder.parameters()) if vae.encoder is not None else 0,
        "decoder_parameters": sum(p.numel() for p in vae.decoder.parameters()) if vae.decoder is not None else 0,
        "downsampling_factor": f,
        "image_shape": [3, height, width],
        "latent_shape": list(latent),
        # What a diffusion model sees: FLUX.2's normalisation folds 2x2 latent pixels into channels.
        "normalized_latent_shape": [normalization.channels(latent[0]), latent[1] // patch, latent[2] // patch],
        "compression": round(3 * height * width / (latent[0] * latent[1] * latent[2]), 2),
        "normalization": normalization.to_json(),
        "normalization_formula": str(normalization),
        # ComfyUI's latent_rgb_factors and latent_rgb_factors_bias, over the normalised latents; None: not fitted.
        "latent_preview": None if (preview := vae.latent_preview) is None else preview.to_json(),
    }
