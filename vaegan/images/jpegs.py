"""JPEG decoding on the encoding device, for dataset encoding whose data workers cannot keep up with a GPU.

The workers only read a JPEG's header (`jpeg_header`: its size and EXIF orientation, enough to plan the crop);
the main process decodes a batch of them at once with torchvision's `decode_jpeg` (nvjpeg on CUDA; libjpeg-turbo,
like PIL, on the CPU), then turns each as its EXIF orientation says (`orient`) and crops it by its plan
(`vaegan.images.crops.CropPlan.apply_to_tensor`). What this cannot read the same way as
`vaegan.images.reading.load_image`
(not a JPEG, CMYK, an unreadable header) stays with the workers, image by image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image

from vaegan.images.crops import CropPlan

# EXIF tag 0x0112. Values 2-8 mirror or turn the stored pixels; `PIL.ImageOps.exif_transpose` ignores the rest.
ORIENTATION_TAG = 0x0112
# Orientations that swap width and height.
TRANSPOSING = frozenset({5, 6, 7, 8})
# PIL modes of JPEGs that decode_jpeg(mode=RGB) turns into the RGB `load_image` gives. CMYK stays with PIL, which
# undoes Adobe's inverted CMYK; nvjpeg may not.
DEVICE_MODES = frozenset({"RGB", "L"})


@dataclass(frozen=True)
class JpegImage:
    """A JPEG on its way to the device undecoded: its bytes, its orientation and where its pixels go."""

    data: bytes
    name: str  # for error messages: the name `load_image` would give
    orientation: int  # EXIF orientation, 1 (as stored) to 8
    plan: CropPlan  # made for the oriented size


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, orientation) of a JPEG, width and height as oriented, from its header alone; None when the
    bytes are not a JPEG the device decodes as `load_image` would (then PIL reads it, and reports what is wrong)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header, not the pixels
            if image.format != "JPEG" or image.mode not in DEVICE_MODES:
                return None
            width, height = image.size
            orientation = image.getexif().get(ORIENTATION_TAG, 1)  # also read from XMP, as exif_transpose does
    except Exception:  # a header PIL cannot parse: whatever it is, `load_image` names it
        return None
    orientation = orientation if orientation in range(1, 9) else 1
    return (height, width, orientation) if orientation in TRANSPOSING else (width, height, orientation)


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) pixels as stored -> as `PIL.ImageOps.exif_transpose` turns them for this EXIF orientation."""
    rows, columns = -2, -1
    if orientation == 2:  # mirrored left to right
        return pixels.flip(columns)
    if orientation == 3:  # turned 180 degrees
        return pixels.flip(rows, columns)
    if orientation == 4:  # mirrored top to bottom
        return pixels.flip(rows)
    if orientation == 5:  # transposed (mirrored across the main diagonal)
        return pixels.transpose(rows, columns)
    if orientation == 6:  # turned 90 degrees clockwise
        return pixels.rot90(-1, (rows, columns))
    if orientation == 7:  # transversed (mirrored across the other diagonal)
        return pixels.transpose(rows, columns).flip(rows, columns)
    if orientation == 8:  # turned 90 degrees counter-clockwise
        return pixels.rot90(1, (rows, columns))
    return pixels


def decode_jpegs(images: list[JpegImage], device: torch.device) -> list[torch.Tensor | None]:
    """Decode, orient and crop JPEGs on `device`, batched: (3, h, w) uint8 each, or None for one that decode_jpeg
    refuses (corrupt, or a kind nvjpeg does not decode), for the caller to read with PIL."""
    from torchvision.io import ImageReadMode, decode_jpeg  # imported here: only this path needs torchvision.io

    data = [torch.frombuffer(bytearray(image.data), dtype=torch.uint8) for image in images]  # (N,) each, on the CPU
    if device.type == "cuda":
        # nvjpeg does not wait for work queued on the current stream before writing its outputs, which the caching
        # allocator may hand it from blocks that queued kernels (the previous batch's encoding) still read.
        torch.cuda.current_stream(device).synchronize()
    try:
        decoded: list[torch.Tensor | None] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad image fails the whole batch: decode them one by one to find it
        decoded = []
        for one in data:
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    return [
        None if pixels is None else image.plan.apply_to_tensor(orient(pixels, image.orientation))
        for image, pixels in zip(images, decoded, strict=True)
    ]
