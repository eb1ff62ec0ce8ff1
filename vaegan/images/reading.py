"""Image decoding, shared by training, dataset encoding and evaluation (the crops are `vaegan.images.crops`).

Every image that enters vaegan goes through `load_image`, so a photo reads the same way wherever it is used:
EXIF orientation applied, any PIL mode turned into 8-bit RGB with its values scaled (never clipped), and one
`ImageError` naming the file for anything that cannot be read.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
    """The file behind an image source as stored (for decoding elsewhere, `vaegan.images.jpegs`), or None when there is
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


