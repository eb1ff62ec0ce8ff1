"""Image grids a person can look at: input | reconstruction | error (| latent preview), one row per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vaegan.images.convert import to_uint8

# Errors are small; amplifying them by a fixed factor keeps grids from different steps comparable.
ERROR_GAIN = 4.0


def reconstruction_grid(images: torch.Tensor, reconstructions: torch.Tensor, gap: int = 4,
                        previews: torch.Tensor | None = None) -> np.ndarray:
    """Images and reconstructions (B, 3, H, W) in [-1, 1] -> an (H', W', 3) uint8 grid.

    Each row shows the input, the reconstruction and |input - reconstruction| x ERROR_GAIN (grey, white = large),
    then, when given, the latent preview (B, 3, h, w) scaled up to the image's size with square pixels.
    """
    inputs, outputs = to_uint8(images.cpu()), to_uint8(reconstructions.cpu())
    error = (inputs.float() - outputs.float()).abs().mean(dim=1, keepdim=True) * ERROR_GAIN
    columns = [inputs, outputs, error.clamp(0, 255).to(torch.uint8).expand_as(inputs)]
    if previews is not None:
        columns.append(to_uint8(F.interpolate(previews.float().cpu(), size=inputs.shape[-2:], mode="nearest")))
    count, _, height, width = inputs.shape
    grid = np.full((count * (height + gap) - gap, len(columns) * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for row, panels in enumerate(zip(*columns, strict=True)):
        top = row * (height + gap)
        for column, panel in enumerate(panels):
            left = column * (width + gap)
            grid[top : top + height, left : left + width] = panel.permute(1, 2, 0).numpy()
    return grid


def save_grid(grid: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def image_grid(images: torch.Tensor, columns: int = 8, gap: int = 2) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] -> an (H', W', 3) uint8 grid, `columns` per row, white gaps between."""
    pixels = to_uint8(images.cpu())
    count, _, height, width = pixels.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for index, image in enumerate(pixels):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        grid[top:top + height, left:left + width] = image.permute(1, 2, 0).numpy()
    return grid
