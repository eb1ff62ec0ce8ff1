"""Resampling shared by images and their latents: one filter, so a latent and its image are transformed alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of images or latents, (B, C, H, W) -> (B, C, *size), antialiased when shrinking.

    The one resampling of the equivariance regularisers and diagnostics, so a latent and its image pass through
    the same filter. Computed in fp32 (antialiased resampling has no bf16 kernel on CPUs) and returned in the
    input's dtype.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    resized = F.interpolate(_at_least_fp32(x), size=tuple(size), mode="bilinear", align_corners=False,
                            antialias=True)
    return resized.to(x.dtype)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True)
class LatentTransform:
    """τ: resize to `size` latent pixels (None keeps the size), then rotate by `quarter_turns` × 90°.

    Applied to a latent (B, C, h, w) as it is and to its image (B, 3, h·f, w·f) with `factor` f, so both undergo
    the same geometric change: the image is resized to f times the latent's new size.
    """

    size: tuple[int, int] | None = None  # (h', w') in latent pixels
    quarter_turns: int = 0  # counter-clockwise, as torch.rot90

    def __call__(self, x: torch.Tensor, factor: int = 1) -> torch.Tensor:
        if self.size is not None:
            x = resize(x, (self.size[0] * factor, self.size[1] * factor))
        if self.quarter_turns % 4:
            x = torch.rot90(x, self.quarter_turns, dims=(-2, -1))
        return x
