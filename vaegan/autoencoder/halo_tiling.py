"""Exact tiling for networks with a bounded receptive field (the tiny autoencoders without a pool branch).

Each output tile is computed from its input region widened by a halo at least as wide as the network's
receptive radius, and only the tile's own part of the result is kept. Every kept value then saw exactly the
inputs (and, at the image's edges, exactly the zero padding) it sees in the untiled pass, so the tiled result
equals the untiled one up to float rounding, with no blending and no seams. Tiles start on multiples of the
downsampling factor, so every stride-2 convolution keeps the untiled pass's sampling grid.

A network with a GroupNorm (TAEF2's pool branch) normalises with statistics of whatever it is given, so no halo
makes it exact: `Codec` runs those whole, or blends tiles when asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def receptive_radius(layers: nn.Module, encode: bool, factor: int) -> int:
    """How many latent pixels beyond a tile the output of `layers` can depend on (rounded up).

    Walks the convolutions in order: a k x k conv reaches (k // 2) steps of its input's grid, whose step is
    the product of the strides before it (encoder) or one over the upsampling so far (decoder).
    """
    radius, step = 0.0, 1.0  # in input pixels (encoder) or latent pixels (decoder)
    for module in layers.modules():
        if isinstance(module, nn.Conv2d):
            radius += (module.kernel_size[0] // 2) * step
            if encode:
                step *= module.stride[0]
        elif isinstance(module, nn.Upsample):
            step /= module.scale_factor
    return math.ceil(radius / factor) if encode else math.ceil(radius)


def run_with_halo(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, halo: int,
                  factor: int, encode: bool) -> torch.Tensor:
    """`network(x)` computed tile by tile: tiles of `tile` latent pixels, each read with `halo` latent pixels
    of context on every side (clipped at the image). x is an image batch (encode) or latents (decode)."""
    in_scale, out_scale = (factor, 1) if encode else (1, factor)
    height, width = x.shape[-2] // in_scale, x.shape[-1] // in_scale  # in latent pixels
    out = None
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            context_top, context_left = max(top - halo, 0), max(left - halo, 0)
            context_bottom, context_right = min(bottom + halo, height), min(right + halo, width)
            region = x[..., context_top * in_scale:context_bottom * in_scale,
                       context_left * in_scale:context_right * in_scale]
            result = network(region)  # (B, c, context h * out_scale, context w * out_scale)
            if out is None:
                out = result.new_empty(*result.shape[:2], height * out_scale, width * out_scale)
            row, column = (top - context_top) * out_scale, (left - context_left) * out_scale
            out[..., top * out_scale:bottom * out_scale, left * out_scale:right * out_scale] = result[
                ..., row:row + (bottom - top) * out_scale, column:column + (right - left) * out_scale]
    return out
