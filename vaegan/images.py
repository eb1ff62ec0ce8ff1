"""Image decoding and the two crop protocols, shared by training, dataset encoding and evaluation.

Every image that enters vaegan goes through `load_image`, so a photo reads the same way wherever it is used:
EXIF orientation applied, any PIL mode turned into 8-bit RGB with its values scaled (never clipped), and one
`ImageError` naming the file for anything that cannot be read.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

# Crop boxes are (left, top, right, bottom) in pixels of the oriented source image. They are floats because an
# upscaled or resized crop covers a fractional region of the source; dataset encoding records them.
Box = tuple[float, float, float, float]

# Antialiased bicubic for every resize: what torchvision's `Resize(..., BICUBIC)` does on PIL images, the
# usual choice of evaluation scripts, and sharper than bilinear without Lanczos' ringing on hard edges.
RESAMPLE = Image.Resampling.BICUBIC

# Transparent pixels are composited onto white: the common background of product shots, logos and scans, and
# what a browser shows. Black would turn anti-aliased edges of cut-outs into dark halos.
BACKGROUND = (255, 255, 255)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageError(ValueError):
    """An image that cannot be read: the message names the file and the reason."""


def source_name(source: Any) -> str:
    """A short name for an image source, for error messages and skip reports."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, dict):
        return str(source.get("path") or f"<{len(source.get('bytes') or b'')} bytes>")
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or f"<PIL {source.mode} {source.width}x{source.height}>"
    return f"<{type(source).__name__}>"


def load_image(
    source: str | os.PathLike | bytes | dict | Image.Image, name: str | None = None
) -> Image.Image:
    """Decode a file path, encoded bytes, a `datasets` image dict ({"bytes", "path"}) or a PIL image to RGB.

    The whole image is decoded here (not lazily), so truncated files fail now with an `ImageError` rather than
    later inside a transform. `name` overrides the name used in error messages.
    """
    name = name or source_name(source)
    try:
        image = _open(source)
        image.load()  # PIL opens lazily: force the decode so truncation is caught here
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except ImageError as error:
        raise ImageError(f"{name}: {error}") from error
    except UnidentifiedImageError as error:
        raise ImageError(
            f"{name}: not an image PIL can identify (empty, corrupt or another file type)"
        ) from error
    except Exception as error:  # PIL's decoders raise OSError, SyntaxError, struct.error...: all mean "corrupt"
        raise ImageError(f"{name}: cannot decode ({type(error).__name__}: {error})") from error


def _open(source: str | os.PathLike | bytes | dict | Image.Image) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):  # `datasets.Image(decode=False)` rows: bytes when embedded, else a path
        if source.get("bytes") is not None:
            return Image.open(io.BytesIO(source["bytes"]))
        if source.get("path"):
            return Image.open(source["path"])
        raise ImageError("image dict has neither 'bytes' nor 'path'")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("zero bytes")
        return Image.open(io.BytesIO(source))
    if isinstance(source, (str, os.PathLike)):
        if Path(source).is_file() and Path(source).stat().st_size == 0:
            raise ImageError("zero-byte file")
        return Image.open(source)
    raise ImageError(f"cannot read an image from a {type(source).__name__}")


def encoded_bytes(source: str | os.PathLike | bytes | dict | Image.Image) -> bytes | None:
    """The file behind an image source as stored (for decoding elsewhere, `vaegan.jpegs`), or None when there is
    none (a PIL image) or it cannot be read; `load_image` then reads the source and reports what is wrong."""
    try:
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
        if isinstance(source, (bytes, bytearray)):
            return bytes(source)
        if isinstance(source, (str, os.PathLike)):
            return Path(source).read_bytes()
    except OSError:
        return None
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, scaling high bit depths and compositing transparency on white."""
    if image.mode == "RGB":
        # 16-bit-per-channel RGB PNGs also arrive as "RGB": PIL keeps each sample's high byte, a correct /256.
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own convert("RGB") clips 16-bit values at 255, turning most of the range white: scale instead.
        # Mode "I" (32-bit int, from older PIL or TIFF) is read as 16-bit too: the depth it holds in practice.
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255, 32768 -> 128
        return Image.fromarray(scaled).convert("RGB")
    if image.mode == "F":
        raise ImageError(
            "floating-point image (mode F) has no standard value range; convert it to 8 or 16 bit"
        )
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK (PIL undoes Adobe's inverted CMYK JPEGs), YCbCr, ...: PIL's conversion is exact here.
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float tensor (3, H, W) in [-1, 1], the autoencoder's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)
    return tensor.float() / 127.5 - 1.0


@dataclass(frozen=True)
class CropPlan:
    """How an image becomes the pixels that are encoded, worked out from its size alone: resized (antialiased
    bicubic) to `resized` when that differs from its size, then `area` cut out of it. `box` is that area in source
    pixels. Knowing this before decoding lets dataset encoding decode and crop on the GPU (`vaegan.jpegs`)."""

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
    passes one seeded per sample, see `vaegan.data`), else from torch's global generator. Returns the crop, its
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
