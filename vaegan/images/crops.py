"""Crops planned from an image's size alone (centre crops, random crops), and the check that an image is large
enough for them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from vaegan.images.reading import RESAMPLE, Box, ImageError


@dataclass(frozen=True)
class CropPlan:
    """How an image becomes the pixels that are encoded, worked out from its size alone: resized (antialiased
    bicubic) to `resized` when that differs from its size, then `area` cut out of it. `box` is that area in source
    pixels. Knowing this before decoding lets dataset encoding decode and crop on the GPU (`vaegan.images.jpegs`)."""

    resized: tuple[int, int]  # (width, height)
    area: tuple[int, int, int, int]  # (left, top, right, bottom) in pixels of the resized image
    box: Box

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the result."""
        return self.area[2] - self.area[0], self.area[3] - self.area[1]

    def apply(self, image: Image.Image) -> Image.Image:
        """Resize and crop a PIL image of the size this plan was made for."""
        resized = image.resize(self.resized, RESAMPLE) if self.resized != image.size else image
        return resized.crop(self.area)

    def apply_to_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """The same on a (3, H, W) uint8 tensor, on any device: equal to `apply` within one level, on a few pixels
        in ten thousand.

        Like PIL, it resizes the width first, then the height, rounding to 8 bits in between; torch's antialiased
        bicubic uses PIL's kernel (a = -0.5) and support. Resizing both axes at once in float differs by up to
        three levels, and on far more pixels.
        """
        width, height = self.resized
        if (pixels.shape[-1], pixels.shape[-2]) != self.resized:
            values = pixels[None].float()  # (1, 3, H, W)
            for size in ((values.shape[-2], width), (height, width)):
                if tuple(values.shape[-2:]) != size:
                    values = F.interpolate(values, size=size, mode="bicubic", antialias=True).round().clamp(0, 255)
            pixels = values[0].to(torch.uint8)
        left, top, right, bottom = self.area
        return pixels[:, top:bottom, left:right]  # (3, h, w)


def center_crop_plan(width: int, height: int, size: int) -> CropPlan:
    """The evaluation protocol's plan for a width x height image: see `resize_center_crop`."""
    # torchvision truncates the long side (int(), not round()): copy it so sizes agree.
    new_width, new_height = (
        (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    )
    left, top = int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))
    # Per-axis scales: the truncated long side makes them differ slightly, and the box should be exact.
    scale_x, scale_y = new_width / width, new_height / height
    box = (left / scale_x, top / scale_y, (left + size) / scale_x, (top + size) / scale_y)
    return CropPlan((new_width, new_height), (left, top, left + size, top + size), box)


def resize_center_crop(image: Image.Image, size: int) -> tuple[Image.Image, Box]:
    """The evaluation protocol: resize the shorter side to `size` (antialiased bicubic), then centre crop.

    Matches torchvision's `Resize(size, BICUBIC)` + `CenterCrop(size)` on PIL images pixel for pixel, so our
    numbers line up with the usual evaluation scripts. Returns the crop and its box in source pixels.
    """
    plan = center_crop_plan(*image.size, size)
    return plan.apply(image), plan.box


def random_crop(
    image: Image.Image, size: int, flip: bool = True, generator: torch.Generator | None = None
) -> tuple[Image.Image, Box, bool]:
    """The training crop: a random `size` square at native resolution, mirrored with probability 1/2.

    Native resolution because the autoencoder must reproduce the detail it will later encode; downscaling
    first would train it on smoother images than it meets. An image whose shorter side is below `size` is
    upscaled (antialiased bicubic) until it fits. The position and the flip are drawn from `generator` (training
    passes one seeded per sample, see `vaegan.train.data`), else from torch's global generator. Returns the crop, its
    box in source pixels and whether it was flipped.
    """
    width, height = image.size
    scale = max(1.0, size / min(width, height))
    if scale > 1.0:
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), RESAMPLE)
    scaled_width, scaled_height = image.size
    left = int(torch.randint(0, scaled_width - size + 1, (1,), generator=generator))
    top = int(torch.randint(0, scaled_height - size + 1, (1,), generator=generator))
    crop = image.crop((left, top, left + size, top + size))
    flipped = flip and bool(torch.rand((), generator=generator) < 0.5)
    if flipped:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale_x, scale_y = scaled_width / width, scaled_height / height
    return crop, (left / scale_x, top / scale_y, (left + size) / scale_x, (top + size) / scale_y), flipped


def check_size(size: tuple[int, int], min_size: int, name: str) -> None:
    """Refuse an image (width, height) whose shorter side is below `min_size`: upscaling it would mostly teach or
    measure blur. Raises `ImageError` naming the image."""
    if min(size) < min_size:
        raise ImageError(f"{name}: tiny ({size[0]}x{size[1]}, shorter side below min_size={min_size})")
