"""Distilling from latents encoded once: `--data.latents`, a `vaegan encode` folder of the teacher's latents.

Each item pairs a stored latent with the pixels it was encoded from. The source image is read again and sized
by the manifest's resolution policy (the plan the encoder followed), so image and latent line up, one latent
pixel per f x f pixels. Training takes the same random window of both, aligned to the factor f. Nothing is
flipped: a mirrored latent is not the latent of the mirrored image.

A window of a latent is not quite the latent of that window of the image: latents at its edge saw pixels beyond
it. A decoder learns from such a window as from any latent. An encoder regresses onto it, edge and all, so
encode at the training resolution (`vaegan encode --crop R`) when the encoder is distilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from vaegan.autoencoder.normalization import LatentNormalization, unpatchify
from vaegan.images.buckets import ResolutionPolicy
from vaegan.images.readers import ImageReader, Skip, open_reader
from vaegan.images.reading import ImageError, to_tensor
from vaegan.latents.dataset import LatentDataset
from vaegan.train.items import Sample, first_readable, held_out_split

OPTION = "--data.latents"


@dataclass
class EncodedLatents:
    """An opened `vaegan encode` folder: its latents, the images they were encoded from, and how each was sized."""

    path: str                           # as the user typed it
    latents: LatentDataset
    source: str                         # where the images are read from
    reader: ImageReader                 # the encoded source, indexed as the encoder indexed it
    policy: ResolutionPolicy
    factor: int                         # the VAE's downsampling factor
    normalization: LatentNormalization  # what the stored latents are normalised with
    vae_sha256: str                     # the weights that encoded them

    @property
    def store(self) -> str:
        """What was stored per image: "posterior" (mean and log-variance), "mean" or "sample"."""
        return self.latents.store

    def latent_size(self, position: int) -> tuple[int, int]:
        """(h, w) of item `position`'s latent in the VAE's layout (FLUX.2's patches folded back)."""
        _, height, width = self.latents.shapes[position]
        p, q = self.normalization.patch_size or (1, 1)
        return int(height) * p, int(width) * q


def open_encoded(path: str, source: str | None = None) -> EncodedLatents:
    """The encode folder at `path`, its images read from where the manifest says, or from `source` when they
    moved. Refused by name: a folder without a manifest, a streamed source (no random access), a source whose
    files changed since encoding."""
    try:
        latents = LatentDataset(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{OPTION}: {error}") from error
    manifest = latents.manifest
    if manifest is None:
        raise ValueError(f"{OPTION}={path} holds no manifest.json; give the folder `vaegan encode` wrote, not a shard")
    described = manifest["source"]
    if described["items"] is None:
        raise ValueError(f"{OPTION}={path} was encoded from a stream or from tar or Parquet files, which cannot be "
                         "read by index again; encode the source as a folder or map-style dataset")
    where = source or described["input"]
    if not source and not Path(where).exists() and ":" not in where:
        raise ValueError(f"{OPTION}={path} was encoded from {where}, which is not there now; pass --data.source "
                         "with where those images are")
    reader, _ = open_reader(where, described["split"], described["image_column"], min_size=0,
                            id_column=described["id_column"], scan=False)
    if reader.fingerprint() != described["fingerprint"]:
        raise ValueError(f"{OPTION}={path}: the images in {where} changed since they were encoded (files added, "
                         "removed or renamed); encode them again, or point --data.source at the original ones")
    factor = manifest["vae"]["downsampling_factor"]
    policy = ResolutionPolicy.from_json(manifest["resolution"], factor)
    return EncodedLatents(path, latents, where, reader, policy, factor, latents.normalization,
                          manifest["vae"]["sha256"])


class EncodedCrops(Dataset):
    """Map-style over some items of an encode folder (`positions` in its order): item i is
    `{"image": (3, R, R) in [-1, 1], "latent": (C, R/f, R/f) normalised, "logvar": ... for a stored posterior,
    "skipped": [(name, reason)]}`, a window drawn from the sample's seed (the centre without one).

    An image that no longer reads, or no longer has the size it was encoded at, is replaced by the next item, as
    `ImageDataset` does.
    """

    def __init__(self, encoded: EncodedLatents, positions: list[int], resolution: int):
        if resolution % encoded.factor:
            raise ValueError(f"--data.resolution={resolution} must be a multiple of the factor {encoded.factor} "
                             f"of the VAE that encoded {OPTION}={encoded.path}")
        if not positions:
            raise ValueError(f"{OPTION}={encoded.path}: no latents of at least {resolution} px to train on")
        self.encoded, self.positions, self.resolution = encoded, positions, resolution
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: int | Sample) -> dict[str, Any]:
        index, generator = key, None
        if isinstance(key, Sample):
            index, generator = key.index, torch.Generator().manual_seed(key.seed)
        (pixels, tensors), skipped = first_readable(index, len(self), self._bad, self._read, self._name)
        f, window = self.encoded.factor, self.resolution // self.encoded.factor
        height, width = tensors["latent"].shape[-2:]
        top, left = (_offset(height - window, generator), _offset(width - window, generator))
        item = {name: value[:, top:top + window, left:left + window] for name, value in tensors.items()}
        crop = pixels.crop((left * f, top * f, (left + window) * f, (top + window) * f))
        return {"image": to_tensor(crop), **item, "skipped": skipped}

    def _read(self, index: int) -> tuple[Image.Image, dict[str, torch.Tensor]]:
        """Item `index`'s image as the encoder sized it, and its stored tensors in the VAE's layout."""
        encoded, position = self.encoded, self.positions[index]
        source_index = int(encoded.latents.indices[position])
        image = encoded.reader.read(source_index)
        pixels = encoded.policy.plan(*image.size).apply(image)
        height, width = encoded.latent_size(position)
        if pixels.size != (width * encoded.factor, height * encoded.factor):
            raise ImageError(f"{self._name(index)}: is {image.width}x{image.height} now, not the image encoded in "
                             f"{encoded.path}")
        stored = encoded.latents.stored(position)
        tensors = {"latent": stored.get("mean", stored.get("latent"))}
        if "logvar" in stored:
            tensors["logvar"] = stored["logvar"]
        if encoded.normalization.patch_size is not None:
            tensors = {name: unpatchify(value[None], encoded.normalization.patch_size)[0]
                       for name, value in tensors.items()}
        return pixels, tensors

    def _name(self, index: int) -> str:
        return self.encoded.reader.name(int(self.encoded.latents.indices[self.positions[index]]))


def _offset(room: int, generator: torch.Generator | None) -> int:
    """A window's offset with `room` latent pixels to spare: drawn, or centred without a generator."""
    if generator is None:
        return room // 2
    return int(torch.randint(0, room + 1, (), generator=generator))


def split_encoded(encoded: EncodedLatents, resolution: int, held_out: int, seed: int
                  ) -> tuple[list[int], list[int], list[Skip]]:
    """(training positions, held-out source indices, skips): latents smaller than the training crop are skipped;
    `held_out` of the rest, a seeded choice, go to validation as source images."""
    usable, skipped = [], []
    for position in range(len(encoded.latents)):
        height, width = encoded.latent_size(position)
        if min(height, width) * encoded.factor < resolution:
            name = encoded.reader.name(int(encoded.latents.indices[position]))
            skipped.append((name, f"{name}: encoded at {width * encoded.factor}x{height * encoded.factor}, "
                                  f"smaller than the {resolution} px training crop"))
        else:
            usable.append(position)
    if held_out >= len(usable):
        raise ValueError(f"{OPTION}={encoded.path}: holding out {held_out} of {len(usable)} usable latents leaves "
                         "nothing to train on; lower --data.val_count / --data.val_holdout or give --data.val_source")
    kept, val = held_out_split(len(usable), held_out, seed)
    return [usable[i] for i in kept], sorted(int(encoded.latents.indices[usable[i]]) for i in val), skipped
