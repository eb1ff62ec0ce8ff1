"""`vaegan convert` and `vaegan info`: a VAE in any format vaegan reads, written as another or described."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.formats.card import model_card
from vaegan.formats.checkpoints import CheckpointError, read_checkpoint
from vaegan.formats.load import load
from vaegan.formats.naming import METADATA_KEY
from vaegan.formats.save import save
from vaegan.utils.dtypes import resolve_dtype


def convert(
    source: str,
    destination: str,
    *,
    to: Literal["diffusers", "single-file"],
    dtype: Literal["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"] | None = None,
    preset: str | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    eval_report: str | None = None,
) -> Path:
    """Convert any VAE vaegan reads to a diffusers folder (with a model card) or a single file.

    Args:
        source: a diffusers folder, single file, training checkpoint, or a hub name owner/name.
        destination: output folder (diffusers) or .safetensors file (single-file).
        to: output format.
        dtype: store the weights in this precision (fp32, bf16, fp16, as every command spells it; the long
            names float32, bfloat16, float16 are read too); default: as loaded (fp32).
        preset: architecture preset (sd, sdxl, sd3, flux, flux2, mini) for files that carry no config.
        scaling_factor: override the scaling factor.
        shift_factor: override the shift factor.
        subfolder: the folder of the source (or hub repository) that holds the VAE; default: the root, then vae/.
        revision: of a hub name: branch, tag or commit.
        eval_report: a `vaegan eval` output folder whose results the model card shows.
    """
    vae = load(source, config=preset, scaling_factor=scaling_factor, shift_factor=shift_factor,
               subfolder=subfolder, revision=revision)
    card = model_card(vae, Path(destination).name, eval_report) if to == "diffusers" else None
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
    return summary


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
        "encoder_parameters": sum(p.numel() for p in vae.encoder.parameters()),
        "decoder_parameters": sum(p.numel() for p in vae.decoder.parameters()),
        "downsampling_factor": f,
        "image_shape": [config.in_channels, height, width],
        "latent_shape": list(latent),
        # What a diffusion model sees: FLUX.2's normalisation folds 2x2 latent pixels into channels.
        "normalized_latent_shape": [normalization.channels(latent[0]), latent[1] // patch, latent[2] // patch],
        "compression": round(config.in_channels * height * width / (latent[0] * latent[1] * latent[2]), 2),
        "normalization": normalization.to_json(),
        "normalization_formula": str(normalization),
    }
