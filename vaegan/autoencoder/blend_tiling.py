"""Blended tiling's geometry: overlapping tiles that cover an image, and the weights that blend their outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileGrid:
    """Equally sized, overlapping tiles covering one axis of length `length` (all in the same units)."""

    length: int
    tile: int
    starts: tuple[int, ...]
    ramp: int  # length of the blending ramp at each edge a tile shares with a neighbour

    @classmethod
    def cover(cls, length: int, tile: int, overlap: int) -> TileGrid:
        """The fewest tiles of size `tile` that overlap by at least `overlap`, spread evenly over the axis.

        Every tile has the same size (the last one is not cut short but moved back to end at the border), so
        tiles can be stacked into one batch, `torch.compile` sees one shape, and no tile lacks context.
        """
        if length <= tile:
            return cls(length, length, (0,), 0)
        count = math.ceil((length - overlap) / (tile - overlap))
        starts = tuple(round(i * (length - tile) / (count - 1)) for i in range(count))
        actual_overlap = min(a + tile - b for a, b in zip(starts[:-1], starts[1:], strict=True))
        return cls(length, tile, starts, min(actual_overlap, tile // 2))

    def weights(self, index: int, scale: int) -> torch.Tensor:
        """The 1-D blending weight of tile `index` in units `scale` times finer: (tile * scale,).

        A raised-cosine ramp (sin^2) rises over `ramp` at every edge shared with a neighbour and stays 1
        elsewhere; image borders get no ramp. Two tiles overlapping by exactly `ramp` then sum to 1
        (sin^2 + cos^2), and any larger overlap is handled by dividing by the summed weights.
        """
        size, ramp = self.tile * scale, self.ramp * scale
        weight = torch.ones(size, dtype=torch.float64)
        if ramp:
            # Sample at pixel centres so the ramp never reaches exactly 0 (the division stays defined).
            rise = torch.sin(0.5 * math.pi * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp) ** 2
            if index > 0:
                weight[:ramp] = rise
            if index < len(self.starts) - 1:
                weight[size - ramp:] = rise.flip(0)
        return weight


def tile_weight_map(rows: TileGrid, cols: TileGrid, scale: int) -> torch.Tensor:
    """Sum of all tiles' 2-D weights over the output, (rows.length * scale, cols.length * scale)."""
    total = torch.zeros(rows.length * scale, cols.length * scale, dtype=torch.float64)
    for i, top in enumerate(rows.starts):
        for j, left in enumerate(cols.starts):
            weight = torch.outer(rows.weights(i, scale), cols.weights(j, scale))
            total[top * scale:(top + rows.tile) * scale, left * scale:(left + cols.tile) * scale] += weight
    return total


@dataclass(frozen=True)
class Tile:
    """One tile of an image, in latent pixels; `region(scale)` indexes it in a tensor `scale` times finer."""

    top: int
    left: int
    height: int
    width: int

    def region(self, scale: int) -> tuple:
        """(..., rows, columns): the tile in the last two dimensions of any tensor."""
        rows = slice(self.top * scale, (self.top + self.height) * scale)
        columns = slice(self.left * scale, (self.left + self.width) * scale)
        return ..., rows, columns


def blend_tiles(rows: TileGrid, cols: TileGrid, scale: int) -> list[tuple[Tile, torch.Tensor]]:
    """Every tile of the grid with its blending weight in the output, normalised so that the weights of the
    tiles covering any output pixel sum to 1: the output is sum(w_t * y_t). Weights are float32,
    (tile * scale, tile * scale)."""
    normaliser = tile_weight_map(rows, cols, scale)  # (rows.length * scale, cols.length * scale)
    tiles = []
    for i, top in enumerate(rows.starts):
        for j, left in enumerate(cols.starts):
            tile = Tile(top, left, rows.tile, cols.tile)
            weight = torch.outer(rows.weights(i, scale), cols.weights(j, scale))
            tiles.append((tile, (weight / normaliser[tile.region(scale)]).float()))
    return tiles
