"""Resolution policies for dataset encoding: what size each image is encoded at, and which part of it.

Three policies, one per way diffusion models are trained:

  crop      the shorter side resized to `size`, then the centre square (DiT, SD 1.x): `resize_center_crop`,
            the same protocol as evaluation, so one image gives the same latent everywhere.
  buckets   aspect-ratio buckets under a pixel budget of `size`^2 (SDXL, SD3, Flux): every bucket's sides are
            multiples of `step` and its area is as large as fits the budget; an image goes to the bucket nearest
            its aspect ratio, is resized until it covers the bucket and loses only the overhang, centred. Images
            are never distorted, and few buckets means full batches.
  max-side  the image as it is, downscaled only when its longer side exceeds `size`, then centre-cropped by at
            most `step - 1` pixels per side so both sides are multiples of `step`. Many shapes, so small batches:
            for inspection and evaluation sets rather than training sets.

Each policy plans from the image's size alone (a `CropPlan`: the resize, the crop and the crop box (left, top,
right, bottom) in source pixels, which the shards store so that SDXL-style micro-conditioning (original size, crop
offsets) can be computed later), so the plan can be made before the image is decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from vaegan.images.crops import CropPlan, center_crop_plan
from vaegan.images.reading import Box, ImageError

PolicyKind = Literal["crop", "buckets", "max-side"]

# SDXL's buckets step by 64 px: 8 latent pixels of an f8 VAE, so a DiT with patch size 2 (or a U-Net that halves
# the latent three times) divides every bucket evenly, and a 1024^2 budget gives a manageable ~40 buckets.
DEFAULT_BUCKET_STEP = 64
# SDXL's most extreme buckets are 4:1 (2048x512 at 1024^2); wider images lose their ends to the crop.
DEFAULT_MAX_ASPECT = 4.0


def make_buckets(size: int, step: int, max_aspect: float = DEFAULT_MAX_ASPECT) -> list[tuple[int, int]]:
    """Bucket shapes (width, height) for a budget of size^2 pixels, sorted from tallest to widest.

    For each width that is a multiple of `step` up to `size`, the tallest multiple of `step` that keeps the
    area within the budget; every portrait bucket also gives its landscape twin, so the list is symmetric
    (SDXL's list, for size=1024 and step=64, has the same shapes).
    """
    if size < step or size % step:
        raise ValueError(f"bucket size {size} must be a positive multiple of the bucket step {step}")
    budget = size * size
    shapes = set()
    for width in range(step, size + 1, step):
        height = budget // width // step * step
        if height / width <= max_aspect:
            shapes.update({(width, height), (height, width)})
    return sorted(shapes, key=lambda shape: shape[0] / shape[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio, so 2:1 and 1:2 are equally far)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda shape: (abs(math.log(shape[0] / shape[1]) - ratio), -shape[0] * shape[1]))


def cover_crop_plan(source_width: int, source_height: int, width: int, height: int) -> CropPlan:
    """Resize (antialiased bicubic, aspect kept) until the image covers width x height, then centre crop."""
    scale = max(width / source_width, height / source_height)
    new_width = max(width, round(source_width * scale))
    new_height = max(height, round(source_height * scale))
    left, top = (new_width - width) // 2, (new_height - height) // 2
    box = _source_box(left, top, width, height, new_width / source_width, new_height / source_height)
    return CropPlan((new_width, new_height), (left, top, left + width, top + height), box)


def resize_cover_crop(image: Image.Image, width: int, height: int) -> tuple[Image.Image, Box]:
    """`cover_crop_plan` applied: the crop and its box in source pixels."""
    plan = cover_crop_plan(*image.size, width, height)
    return plan.apply(image), plan.box


def _source_box(left: int, top: int, width: int, height: int, scale_x: float, scale_y: float) -> Box:
    return (left / scale_x, top / scale_y, (left + width) / scale_x, (top + height) / scale_y)


@dataclass(frozen=True)
class ResolutionPolicy:
    """How images are sized before encoding; see the module docstring for the three kinds."""

    kind: PolicyKind
    size: int  # crop: the square's side; buckets: the side of the pixel budget (size^2); max-side: the cap
    # Every output side is a multiple of this (buckets, max-side); must be a multiple of the VAE's factor.
    step: int
    max_aspect: float = DEFAULT_MAX_ASPECT  # buckets only
    # Images whose shorter side is below this are refused as tiny (they would be upscaled past 2x).
    min_size: int = 0
    buckets: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    @classmethod
    def create(
        cls,
        kind: PolicyKind,
        size: int,
        factor: int,
        step: int | None = None,
        max_aspect: float = DEFAULT_MAX_ASPECT,
        min_size: int | None = None,
    ) -> ResolutionPolicy:
        """Check the settings against the VAE's downsampling factor and fill in the defaults.

        step: buckets default to 64 px (SDXL), max-side to the factor itself (the least cropping).
        min_size: default half the nominal side for crop and buckets (no image is upscaled more than 2x),
            and the step for max-side (which never upscales; anything smaller would be cropped away).
        """
        if kind not in ("crop", "buckets", "max-side"):
            raise ValueError(f"unknown resolution policy {kind!r}; choose crop, buckets or max-side")
        if step is None:
            step = DEFAULT_BUCKET_STEP if kind == "buckets" and DEFAULT_BUCKET_STEP % factor == 0 else factor
        if step % factor:
            raise ValueError(f"step {step} must be a multiple of the VAE's downsampling factor {factor}")
        if kind == "crop" and size % factor:
            raise ValueError(f"crop size {size} must be a multiple of the VAE's downsampling factor {factor}")
        if size < step:
            raise ValueError(f"size {size} is smaller than the step {step}")
        if max_aspect < 1:
            raise ValueError(f"max_aspect {max_aspect} must be at least 1")
        if min_size is None:
            min_size = step if kind == "max-side" else size // 2
        buckets = tuple(make_buckets(size, step, max_aspect)) if kind == "buckets" else ()
        return cls(kind, size, step, max_aspect, min_size, buckets)

    def plan(self, width: int, height: int) -> CropPlan:
        """How a width x height image (oriented) becomes the image to encode (sides multiples of the factor).

        Raises `ImageError` when max-side would leave nothing (a sliver thinner than the step once capped).
        """
        if self.kind == "crop":
            return center_crop_plan(width, height, self.size)
        if self.kind == "buckets":
            return cover_crop_plan(width, height, *nearest_bucket(width, height, list(self.buckets)))
        scale = min(1.0, self.size / max(width, height))  # never upscaled
        new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
        crop_width, crop_height = new_width // self.step * self.step, new_height // self.step * self.step
        if not crop_width or not crop_height:
            raise ImageError(
                f"{new_width}x{new_height} after capping the longer side at {self.size}: a side is below the "
                f"step {self.step}, nothing would be left to encode"
            )
        left, top = (new_width - crop_width) // 2, (new_height - crop_height) // 2
        box = _source_box(left, top, crop_width, crop_height, new_width / width, new_height / height)
        return CropPlan((new_width, new_height), (left, top, left + crop_width, top + crop_height), box)

    def apply(self, image: Image.Image) -> tuple[Image.Image, Box]:
        """The image to encode and its crop box in source pixels (`plan`, applied)."""
        plan = self.plan(*image.size)
        return plan.apply(image), plan.box

    @classmethod
    def from_json(cls, description: dict, factor: int) -> ResolutionPolicy:
        """The policy a manifest describes (`to_json`), checked against the VAE's factor again."""
        return cls.create(description["policy"], description["size"], factor, description["step"],
                          description.get("max_aspect", DEFAULT_MAX_ASPECT), description["min_size"])

    def to_json(self) -> dict:
        """The policy as JSON for the manifest (buckets listed as [width, height])."""
        description = {"policy": self.kind, "size": self.size, "step": self.step, "min_size": self.min_size}
        if self.kind == "buckets":
            description.update(max_aspect=self.max_aspect, pixel_budget=self.size**2,
                               buckets=[list(shape) for shape in self.buckets])
        return description
