"""Conversions between the image kinds users hold (float or uint8 tensors, numpy arrays, PIL images) and the
float tensors in [-1, 1] the networks take."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from einops import rearrange
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255], rounded as a PNG writer would."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


OutputKind = Literal["tensor", "uint8", "numpy", "pil"]


ImageInput = torch.Tensor | np.ndarray | Image.Image | Sequence[Image.Image]


def to_float_images(images: ImageInput) -> torch.Tensor:
    """Any accepted image kind -> float32 tensor (B, 3, H, W) in [-1, 1] on the input's device."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images or not all(isinstance(image, Image.Image) for image in images):
            raise TypeError("a list of images must be a non-empty list of PIL images")
        sizes = {image.size for image in images}
        if len(sizes) > 1:
            raise ValueError(f"PIL images in one call must share a size, got {sorted(sizes)}")
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])  # (B, H, W, 3)
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (H, W, 3) or (B, H, W, 3), got dtype {images.dtype}")
        array = images[None] if images.ndim == 3 else images
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"numpy images must be (H, W, 3) or (B, H, W, 3), got shape {images.shape}")
        images = rearrange(torch.from_numpy(np.ascontiguousarray(array)), "b h w c -> b c h w")
    if not torch.is_tensor(images):
        raise TypeError(f"unsupported image type {type(images).__name__}; see vaegan.autoencoder.codec's docstring")
    x = images[None] if images.ndim == 3 else images
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"image tensors must be (B, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    if not x.is_floating_point():
        raise TypeError(f"image tensors must be uint8 or float, got {x.dtype}")
    # Catch 0..255 floats (a silent washed-out mistake); [0, 1] cannot be told apart from [-1, 1] and passes.
    if x.numel() and x.abs().max() > 1.5:
        raise ValueError(
            f"float images must be in [-1, 1], got values up to {x.abs().max().item():.3g}; "
            "pass uint8 for 0..255 images"
        )
    return x.float()


def from_float_images(images: torch.Tensor, output: OutputKind) -> torch.Tensor | np.ndarray | list:
    """Float images (B, 3, H, W) in [-1, 1] -> the requested kind (see `Codec.decode`)."""
    if output == "tensor":
        return images
    as_uint8 = to_uint8(images)  # (B, 3, H, W)
    if output == "uint8":
        return as_uint8
    array = rearrange(as_uint8, "b c h w -> b h w c").cpu().numpy()
    if output == "numpy":
        return array
    return [Image.fromarray(image) for image in array]
