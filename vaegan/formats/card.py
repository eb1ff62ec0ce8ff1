"""The model card of an exported diffusers folder (its README.md): what the VAE is, which pipelines it drops
into, how to load it, and, when an evaluation is given, how it scored."""

from __future__ import annotations

from pathlib import Path

from vaegan.autoencoder.network import AutoencoderKL
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.formats.save import diffusers_class

# Image sides at which the card lists the latent shapes.
CARD_SIZES = (256, 512, 1024)


def pipelines(vae: AutoencoderKL, normalization: LatentNormalization) -> str:
    """The diffusers pipelines that read this VAE's normalisation as it is written."""
    if normalization.kind == "patch":
        return "`Flux2Pipeline` (it normalises 2x2 patches of the latents with the VAE's `bn` statistics)"
    if normalization.kind == "channel":
        return ("pipelines that read `latents_mean`/`latents_std` from the VAE's config (diffusers' Stable Diffusion "
                "XL pipelines); others would use the scaling factor alone")
    channels, shift = vae.config.latent_channels, vae.config.shift_factor or 0.0
    if channels == 16:
        return "Stable Diffusion 3 and FLUX.1 pipelines (16 latent channels, scaling and shift factors)"
    if channels == 4 and shift == 0:
        return "Stable Diffusion 1.x/2.x, SDXL and DiT pipelines (4 latent channels, the scaling factor)"
    if channels == 4:
        return (f"a diffusion model trained on these latents by a pipeline that subtracts the shift factor "
                f"({shift:g}) as diffusers' SD3 and FLUX.1 pipelines do; Stable Diffusion 1.x/2.x, SDXL and DiT "
                "pipelines read only the scaling factor (for them, export with `--convention scale`)")
    return (f"a diffusion model trained on these {channels}-channel latents (no released pipeline's denoiser takes "
            f"{channels} channels)")


def model_card(vae: AutoencoderKL, name: str, eval_report: str | None = None) -> str:
    """README.md for a diffusers folder of `vae`; `eval_report` is a `vaegan eval` output folder."""
    config = vae.config
    normalization = LatentNormalization.of(vae)
    diffusers_name = diffusers_class(config)
    f, patch = config.downsampling_factor, normalization.spatial_factor
    channels = normalization.channels(config.latent_channels)
    shapes = "\n".join(
        f"| {size}² | {config.latent_channels}×{size // f}×{size // f} | {channels}×{size // f // patch}×"
        f"{size // f // patch} |"
        for size in CARD_SIZES
    )
    decoder = "" if config.decoder_block_out_channels is None else f", decoder {list(config.decoder_widths)}"
    lines = [
        "---", "library_name: diffusers", "tags: [vae, autoencoder, latent-diffusion, vaegan]", "---", "",
        f"# {name}", "",
        f"A KL autoencoder (the VAE of latent diffusion) in diffusers' `{diffusers_name}` format, written by vaegan.",
        "",
        f"- **Architecture**: widths {list(config.block_out_channels)}{decoder}, {config.layers_per_block} resnet "
        f"blocks per level, f{f}, {config.latent_channels} latent channels, {vae.num_parameters():,} parameters.",
        f"- **Latent normalisation** ({normalization.kind}): z_model = {normalization}.",
        f"- **Drops into**: {pipelines(vae, normalization)}.", "",
        "| image | latent | normalised latent (what a diffusion model sees) |", "| --- | --- | --- |", shapes, "",
        "## Load it", "", "```python",
        f"from diffusers import {diffusers_name}",
        f'vae = {diffusers_name}.from_pretrained("{name}")', "", "import vaegan",
        f'codec = vaegan.Codec(vaegan.load("{name}"))       # encode() returns normalised latents',
        "```", "",
    ]
    if eval_report is not None:
        results = Path(eval_report) / "results.md"
        if not results.is_file():
            raise FileNotFoundError(f"{results} not found: eval_report must be an output folder of `vaegan eval`")
        table = results.read_text().replace("# Reconstruction benchmark", "").strip()
        lines += ["## Reconstruction", "", table, ""]
    return "\n".join(lines)


def tiny_model_card(model: TinyAutoencoder, name: str) -> str:
    """README.md for a distilled tiny autoencoder: what it is, its teacher, and how to use it beside that teacher."""
    config = model.config
    teacher = config.teacher or "an unrecorded VAE"
    layout = (" (its 2x2 patches, as FLUX.2's pipelines normalise them: the codec folds them for the student)"
              if config.patch_size else "")
    encoder = sum(p.numel() for p in model.encoder.parameters()) if model.encoder is not None else 0
    decoder = sum(p.numel() for p in model.decoder.parameters()) if model.decoder is not None else 0
    diffusers = ["from diffusers import AutoencoderTiny", f'tiny = AutoencoderTiny.from_pretrained("{name}")', ""]
    return "\n".join([
        "---", "library_name: diffusers", "tags: [vae, autoencoder, taesd, latent-diffusion, vaegan]", "---", "",
        f"# {name}", "",
        f"A tiny autoencoder (TAESD's Conv+ReLU design) distilled by vaegan from **{teacher}**. It encodes images to "
        f"and decodes images from that VAE's normalised latents{layout}: a fast previewer and a cheap stand-in.", "",
        f"- **Architecture**: f{config.downsampling_factor}, {config.latent_channels} latent channels, encoder widths "
        f"{list(config.encoder_block_out_channels)}, decoder widths {list(config.decoder_block_out_channels)}; "
        f"{encoder:,} encoder and {decoder:,} decoder parameters.", "",
        "## Load it", "", "```python", *(diffusers if config.diffusers_compatible else []), "import vaegan",
        f'preview = vaegan.Codec(vaegan.load("{name}"))',
        f'latents = vaegan.Codec(vaegan.load("{teacher}")).encode(images)  # the teacher\'s latents',
        "images = preview.decode(latents)", "```", "",
    ])


def card_for(model: AutoencoderKL | TinyAutoencoder, destination: str, format: str,
             eval_report: str | None = None) -> str | None:
    """The README.md that saving `model` to `destination` as `format` writes: a folder's card (a VAE's only in a
    diffusers folder, a tiny autoencoder's in its pair folder too), none for a single file."""
    name = Path(destination).name
    if isinstance(model, TinyAutoencoder):
        return tiny_model_card(model, name) if format != "single-file" else None
    return model_card(model, name, eval_report) if format == "diffusers" else None
