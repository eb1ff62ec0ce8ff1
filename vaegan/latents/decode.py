"""`vaegan decode`: latent shards, or the latents a diffusion sampler saved, back into image files."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from vaegan.autoencoder.codec import Codec, Tiling, check_finite
from vaegan.autoencoder.network import weights_sha256
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.formats.checkpoints import load_error_reason
from vaegan.formats.load import load
from vaegan.images.convert import from_float_images
from vaegan.latents.dataset import LatentDataset

IMAGE_FORMATS = {"png": ("PNG", ".png"), "webp": ("WEBP", ".webp"), "jpeg": ("JPEG", ".jpg"), "jpg": ("JPEG", ".jpg")}
TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy")


def read_latent_file(path: Path) -> list[tuple[str, torch.Tensor]]:
    """Normalised latents saved by a diffusion sampler: (name, (C, h, w)) for each latent in the file.

    A tensor (B, C, h, w) or (C, h, w) in .pt/.pth/.npy, or every tensor of a .safetensors file or of a dict
    saved with torch.save; the i-th latent of tensor `key` is named "key-i" (the file's stem for a bare tensor).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
        elif path.suffix == ".npy":
            tensors = {path.stem: torch.from_numpy(np.load(path, allow_pickle=False))}
        else:  # weights_only: tensors and plain containers, never pickled code
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            tensors = loaded if isinstance(loaded, dict) else {path.stem: loaded}
    except FileNotFoundError:
        raise
    except Exception as error:  # each reader fails on a damaged or foreign file with its own error types
        raise ValueError(f"{path} is not a readable latent file ({type(error).__name__}: {load_error_reason(error)})"
                         "; decode reads tensors saved by torch.save, numpy or safetensors") from error
    latents = []
    for key, tensor in tensors.items():
        if not torch.is_tensor(tensor) or tensor.ndim not in (3, 4) or not tensor.is_floating_point():
            raise ValueError(f"{path}: {key!r} is not a float latent tensor (B, C, h, w) or (C, h, w)")
        batch = tensor[None] if tensor.ndim == 3 else tensor
        latents += [(f"{key}-{i:05d}", latent.float()) for i, latent in enumerate(batch)]
    return latents


def save_options(pil_format: str, quality: int) -> dict:
    """PIL's save arguments: PNG is lossless anyway; WebP at quality 100 is written lossless, JPEG never is."""
    if pil_format == "PNG":
        return {}
    if pil_format == "WEBP" and quality >= 100:
        return {"lossless": True}
    return {"quality": quality}


def image_path(folder: Path, name: str, suffix: str, taken: set[Path]) -> Path:
    """Where the image of latent `name` goes: its id as a relative path, with the image format's suffix.

    Ids cannot leave `folder` (absolute parts and ".." are dropped); two ids that would collide once their
    suffix is replaced ("a.jpg", "a.png") keep the original suffix too ("a.png.png").
    """
    parts = [part for part in Path(name).parts if part not in ("", ".", "..") and part != Path(name).anchor]
    relative = Path(*parts) if parts else Path("latent")
    path = folder / relative.with_suffix(suffix) if relative.suffix else folder / f"{relative}{suffix}"
    if path in taken:
        path = folder / f"{relative}{suffix}"
    taken.add(path)
    return path


def decode_latents(
    *,
    input: str,
    output: str,
    model: str | None = None,
    format: Literal["png", "webp", "jpeg"] = "png",
    quality: int = 95,
    sample: bool = False,
    ids: list[str] | None = None,
    limit: int | None = None,
    device: str | None = None,
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    batch_size: int = 4,
    tile_size: int | None = None,
    tiling: Tiling = "exact",
    preset: str | None = None,
    allow_nonfinite: bool = False,
    preview: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Decode latents back to images; returns the image paths.

    The latents are a vaegan encode folder or shard (images named by id, in subfolders as the ids have them), or a
    tensor file of normalised latents from a diffusion sampler.

    Args:
        input: a vaegan encode folder (local or a URL, as `LatentDataset` reads) or shard file, or a local
            .pt/.pth/.npy/.safetensors file of normalised latents (B, C, h, w) or (C, h, w) (see
            `read_latent_file`).
        output: folder for the images.
        model: any VAE vaegan reads; default: the one the manifest names, if it is still there. A VAE other than
            the encoder is allowed (a fine-tuned decoder) but warned about.
        format: image format.
        quality: webp/jpeg quality; webp at 100 is lossless.
        sample: decode a sample of the stored posterior instead of its mean.
        ids: decode only these ids.
        limit: decode only the first N latents.
        device: cpu, cuda, cuda:N; default: cuda when available.
        dtype: precision of the decoder.
        batch_size: latents (or tiles) per forward pass.
        tile_size: decode in tiles of this many pixels; default: only images above 1024^2, so memory stays
            bounded.
        tiling: exact tiles decode what the untiled decoder would; blend is faster and approximate.
        preset: architecture preset (sd, sdxl, sd3, flux, flux2, mini) for model files that carry no config.
        allow_nonfinite: decode latents that hold NaN or inf (they make black or garbage images) instead of
            refusing the file.
        preview: write previews at the latent resolution (an SD VAE's are 1/8 of the image's side) with the
            VAE's stored latent -> RGB map instead of running the decoder: instant and approximate.
        progress: show a progress bar, and a summary at the end.
    """
    if format not in IMAGE_FORMATS:
        raise ValueError(f"format={format!r}; choose one of png, webp, jpeg")
    pil_format, suffix = IMAGE_FORMATS[format]
    source, folder = str(input), Path(output)  # a string: the folder may be a URL (`s3://...`)
    if Path(source).suffix in TENSOR_SUFFIXES:
        named = read_latent_file(Path(source))
        for name, latent in named if not allow_nonfinite else ():  # before anything is written
            check_finite(latent, f"{source}, latent {name}", "--allow_nonfinite true")
        dataset, expected_hash = None, None
        if model is None:
            raise ValueError(f"{source}: a tensor file does not say which VAE made it; give the VAE with --model "
                             "(model= in Python)")
    else:
        dataset = LatentDataset(source, sample=sample)
        expected_hash = dataset.metadata.get("vae_sha256")
        if model is None:
            named_model = (dataset.manifest or {}).get("vae", {}).get("source")
            if not named_model or not Path(named_model).exists():
                raise ValueError(f"{source}: the VAE that encoded it ({named_model or 'unknown'}) is not at hand; "
                                 "give the VAE with --model (model= in Python)")
            model = named_model
    vae = load(model, config=preset)
    if preview and isinstance(vae, TinyAutoencoder):
        raise ValueError(f"--preview: {model} is a tiny autoencoder, already the fast previewer; decode without "
                         "--preview")
    latent_preview = vae.latent_preview
    if preview and latent_preview is None:
        raise ValueError(f"--preview: {model} stores no latent preview map; `vaegan convert {model} OUTPUT "
                         "--fit_preview IMAGES` fits one (`vaegan export` always does)")
    if expected_hash and weights_sha256(vae) != expected_hash:
        warnings.warn(f"decoding {source} with {model}, not the VAE that encoded it (weights differ)", stacklevel=2)
    normalization = LatentNormalization.of(vae)
    # A preview needs no network: the decoder is not even moved to the device.
    codec = None if preview else Codec(vae, device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                                       dtype=dtype, batch_size=batch_size, tile_size=tile_size, tiling=tiling)
    all_names = dataset.ids if dataset is not None else [name for name, _ in named]
    all_shapes = dataset.shapes if dataset is not None else [latent.shape for _, latent in named]
    wanted = None if ids is None else set(ids)
    selected = [i for i, name in enumerate(all_names) if wanted is None or name in wanted]
    missing = sorted((wanted or set()) - {all_names[i] for i in selected})
    if missing:
        raise ValueError(f"{source}: no latents with ids {missing[:10]}")
    selected = selected[:limit]
    names = {i: all_names[i] for i in selected}
    shapes = {i: tuple(all_shapes[i]) for i in selected}

    def latent(position: int) -> torch.Tensor:
        """A normalised latent (C, h, w) as the decoding codec expects it."""
        if dataset is None:
            return named[position][1]
        # Stored latents are normalised as the encoding VAE declared; the codec expects its own VAE's.
        stored = dataset[position]["latent"][None]                                 # (1, C, h, w)
        return normalization.normalize(dataset.normalization.denormalize(stored))[0]

    # Batches of one shape, in the order the latents were listed within each shape.
    by_shape: dict[tuple, list[int]] = {}
    for position in selected:
        by_shape.setdefault(shapes[position], []).append(position)
    chunks = [members[i:i + batch_size] for members in by_shape.values() for i in range(0, len(members), batch_size)]
    written: list[Path] = []
    taken: set[Path] = set()
    with tqdm(total=len(selected), unit="img", desc="decoding", disable=not progress) as bar:
        for chunk in chunks:
            latents = torch.stack([latent(position) for position in chunk])
            if codec is not None:
                images = codec.decode(latents, output="pil", allow_nonfinite=allow_nonfinite)
            else:
                if not allow_nonfinite:
                    check_finite(latents)
                images = from_float_images(latent_preview.apply(latents), "pil")  # (B, 3, h, w)
            for position, image in zip(chunk, images, strict=True):
                path = image_path(folder, names[position], suffix, taken)
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path, pil_format, **save_options(pil_format, quality))
                written.append(path)
            bar.update(len(chunk))
    if progress:
        print(f"wrote {len(written)} images to {folder}")
    return written
