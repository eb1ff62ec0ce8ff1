"""Writing a VAE: a diffusers folder (weights, config.json, model card) or one safetensors file in the original
naming, with the config in its metadata; both replace an existing target atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from vaegan.autoencoder.network import AutoencoderConfig, AutoencoderKL
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.formats.naming import (
    ATTENTION_PROJECTIONS,
    CARD_NAME,
    CONFIG_NAME,
    DIFFUSERS_KEYS,
    METADATA_KEY,
    PREVIEW_METADATA_KEY,
    PREVIEW_NAME,
    WEIGHTS_CANDIDATES,
    WEIGHTS_NAME,
    diffusers_version,
    to_original_name,
)
from vaegan.formats.tiny import save_tiny
from vaegan.utils.dtypes import cast_floating
from vaegan.utils.files import check_replaceable, replace_folder_atomically, write_file_atomically


def diffusers_class(config: AutoencoderConfig) -> str:
    """The diffusers class that builds this network: `AutoencoderKLFlux2` when it carries `bn` statistics."""
    return "AutoencoderKLFlux2" if config.patch_size is not None else "AutoencoderKL"


def diffusers_config(config: AutoencoderConfig) -> dict:
    """config.json for the diffusers class of `config`: exactly the keys its constructor takes, so no warnings.

    Raises ValueError for a setting that class cannot hold, rather than writing a folder that loads as
    another model: diffusers' `AutoencoderKL` has no separate decoder widths, and `AutoencoderKLFlux2` no
    scalar or per-channel factors (`force_upcast`, which no FLUX.2 pipeline reads, is left out).
    """
    class_name = diffusers_class(config)
    if class_name == "AutoencoderKL" and config.decoder_block_out_channels is not None:
        raise ValueError(
            f"diffusers' AutoencoderKL has no decoder_block_out_channels (here "
            f"{list(config.decoder_block_out_channels)}): save this VAE as a single file"
        )
    if class_name == "AutoencoderKLFlux2":
        unsupported = {
            name: getattr(config, name)
            for name, identity in [("scaling_factor", 1.0), ("shift_factor", 0.0), ("latents_mean", None)]
            if getattr(config, name) != identity
        }
        if unsupported:
            raise ValueError(
                f"diffusers' AutoencoderKLFlux2 normalises latents with its bn statistics alone, so it cannot "
                f"hold {unsupported}: reset them, or save this VAE as a single file"
            )
    levels = len(config.block_out_channels)
    values = config.to_dict()  # shift_factor stays a number: SD3/Flux pipelines crash on null
    return {
        "_class_name": class_name,
        "_diffusers_version": diffusers_version(),
        **{key: values[key] for key in DIFFUSERS_KEYS[class_name]},
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def _tensors_for_saving(vae: AutoencoderKL, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {key: cast_floating(tensor.detach().cpu(), dtype).contiguous() for key, tensor in vae.state_dict().items()}


def _original_state_dict(
    tensors: dict[str, torch.Tensor], num_levels: int, nested_quant_convs: bool
) -> dict[str, torch.Tensor]:
    """diffusers-named tensors -> original naming, attention projections as 1x1 conv weights."""
    renamed = {}
    for key, tensor in tensors.items():
        if ATTENTION_PROJECTIONS.search(key):
            tensor = tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        renamed[to_original_name(key, num_levels, nested_quant_convs)] = tensor.contiguous()
    return renamed


def save(
    vae: AutoencoderKL | TinyAutoencoder,
    path: str | os.PathLike,
    format: Literal["diffusers", "single-file", "pair"] = "diffusers",
    dtype: torch.dtype | None = None,
    card: str | None = None,
) -> Path:
    """Write `vae` as a diffusers folder or as one original-naming `.safetensors` file; returns the path.

    `card` is the folder's README.md (`vaegan.formats.card.model_card`); a single file has none.

    The folder is diffusers' `AutoencoderKL`, or `AutoencoderKLFlux2` for a VAE with FLUX.2's `bn` statistics;
    such a VAE's single file takes Black Forest Labs' naming. `dtype` casts the stored floating-point tensors
    (e.g. torch.float16 for a half-size release); the model is unchanged. A latent preview map
    (`vae.latent_preview`) goes beside the weights: `latent_preview.json` in the folder, metadata in the file.

    A `TinyAutoencoder` is written by `vaegan.formats.tiny.save_tiny`, also as `format="pair"`: TAESD's two
    files in their original naming, as safetensors.
    """
    path = Path(path)
    if isinstance(vae, TinyAutoencoder):
        return save_tiny(vae, path, format, dtype, card)
    if format not in ("diffusers", "single-file"):
        raise ValueError(f"format must be 'diffusers' or 'single-file', got {format!r}")
    if format == "single-file" and path.suffix != ".safetensors":
        raise ValueError(f"a single-file VAE is written as .safetensors, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_for_saving(vae, dtype)
    if format == "diffusers":
        config_json = json.dumps(diffusers_config(vae.config), indent=2) + "\n"

        def write_folder(folder: Path) -> None:
            (folder / CONFIG_NAME).write_text(config_json)
            if card is not None:
                (folder / CARD_NAME).write_text(card)
            if vae.latent_preview is not None:
                (folder / PREVIEW_NAME).write_text(json.dumps(vae.latent_preview.to_json()) + "\n")
            save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

        ours = (CONFIG_NAME, CARD_NAME, PREVIEW_NAME, *WEIGHTS_CANDIDATES)
        check_replaceable(path, lambda entry: entry.name in ours, format, "a diffusers VAE")
        replace_folder_atomically(path, write_folder)
    else:
        # FLUX.2's original files are Black Forest Labs'; every other model's, CompVis's.
        nested = vae.config.patch_size is not None
        original = _original_state_dict(tensors, len(vae.config.block_out_channels), nested)
        metadata = {"format": "pt", METADATA_KEY: json.dumps(vae.config.to_dict())}
        if vae.latent_preview is not None:
            metadata[PREVIEW_METADATA_KEY] = json.dumps(vae.latent_preview.to_json())
        write_file_atomically(path, lambda file: save_file(original, str(file), metadata=metadata))
    return path
