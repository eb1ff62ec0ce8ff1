"""Latent previews without a network: the least-squares affine map from a VAE's normalised latents to RGB.

Each latent pixel covers an f x f block of the image, and much of a trained VAE's latent is a linear code of that
block's colour; a C x 3 matrix and a bias read it back at the latent resolution, for nothing. Every diffusion UI
ships such a map per model to show a sampler's progress (ComfyUI's `latent_rgb_factors` and
`latent_rgb_factors_bias`, listed the same way here: one (R, G, B) row per latent channel); `LatentPreviewFit`
measures it for any VAE, `vaegan.save` stores it beside the weights, and `vaegan decode --preview` applies it.

The map reads latents as a diffusion model sees them, normalised by the VAE's declared normalisation (what
`vaegan.Codec.encode` returns): for FLUX.2's patch normalisation that is 4x the VAE's channels at half its latent
resolution. It is fitted against the real images averaged over each latent pixel's area, in float64 through the
normal equations, so any number of batches can be added without holding their latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RGB = 3


@dataclass(frozen=True)
class LatentPreview:
    """An affine latent -> RGB map: rgb = sum_c latent[c] * factors[c] + bias, in [-1, 1] once clamped."""

    factors: tuple[tuple[float, ...], ...]  # (C, 3): ComfyUI's latent_rgb_factors
    bias: tuple[float, ...]  # (3,): ComfyUI's latent_rgb_factors_bias

    def __post_init__(self):
        if not self.factors or any(len(row) != RGB for row in self.factors) or len(self.bias) != RGB:
            raise ValueError(f"a latent preview needs one (R, G, B) row of factors per latent channel and 3 bias "
                             f"values; got {len(self.factors)} rows of lengths {sorted({len(r) for r in self.factors})}"
                             f" and {len(self.bias)} bias values")
        if not all(math.isfinite(value) for row in (*self.factors, self.bias) for value in row):
            raise ValueError("a latent preview's factors and bias must be finite numbers")

    @property
    def channels(self) -> int:
        """Channels of the normalised latents this map reads."""
        return len(self.factors)

    @classmethod
    def from_tensors(cls, factors: torch.Tensor, bias: torch.Tensor) -> LatentPreview:
        """From a (C, 3) factor matrix and a (3,) bias."""
        return cls(tuple(tuple(row) for row in factors.double().cpu().tolist()), tuple(bias.double().cpu().tolist()))

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> preview images (B, 3, h, w), float32 in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit a latent preview of "
                             f"{self.channels} channels: expected (B, {self.channels}, h, w)")
        factors = torch.tensor(self.factors, dtype=torch.float32, device=latents.device)  # (C, 3)
        bias = torch.tensor(self.bias, dtype=torch.float32, device=latents.device).view(1, RGB, 1, 1)
        images = torch.einsum("bchw,ck->bkhw", latents.float(), factors) + bias
        return images.clamp(-1.0, 1.0)

    def reparametrized(self, scale: torch.Tensor, shift: torch.Tensor) -> LatentPreview:
        """The same map for latents n' that relate to this map's n as n = scale * n' + shift, per channel (C,):
        what a stored map becomes when the VAE's normalisation changes."""
        factors = torch.tensor(self.factors, dtype=torch.float64)  # (C, 3)
        scale, shift = scale.double().cpu().flatten(), shift.double().cpu().flatten()
        bias = torch.tensor(self.bias, dtype=torch.float64) + shift @ factors
        return LatentPreview.from_tensors(scale[:, None] * factors, bias)

    def to_json(self) -> dict:
        """ComfyUI's names for the two parts."""
        return {"latent_rgb_factors": [list(row) for row in self.factors], "latent_rgb_factors_bias": list(self.bias)}

    @classmethod
    def from_json(cls, data: dict) -> LatentPreview:
        """Read what `to_json` wrote; raises ValueError for anything else."""
        if not isinstance(data, dict) or not {"latent_rgb_factors", "latent_rgb_factors_bias"} <= data.keys():
            raise ValueError("expected an object with latent_rgb_factors and latent_rgb_factors_bias")
        try:
            factors = tuple(tuple(float(value) for value in row) for row in data["latent_rgb_factors"])
            return cls(factors, tuple(float(value) for value in data["latent_rgb_factors_bias"]))
        except TypeError as error:
            raise ValueError(f"the factors and bias must be lists of numbers ({error})") from error


class LatentPreviewFit:
    """Least squares for a `LatentPreview` over any number of batches: the normal equations in float64."""

    def __init__(self):
        self.xtx: torch.Tensor | None = None  # (C+1, C+1): latents with a ones column for the bias
        self.xty: torch.Tensor | None = None  # (C+1, 3)
        self.yty = torch.zeros(RGB, dtype=torch.float64)  # (3,): sums of squared targets, for the residual
        self.count = 0  # latent positions

    def update(self, latents: torch.Tensor, images: torch.Tensor) -> None:
        """Add normalised latents (B, C, h, w) and their images (B, 3, H, W) in [-1, 1], H and W multiples of
        h and w: each latent pixel is fitted to the mean colour of the image area it covers."""
        if images.shape[0] != latents.shape[0] or images.shape[1] != RGB or latents.ndim != 4:
            raise ValueError(f"latents {tuple(latents.shape)} and images {tuple(images.shape)} do not pair up: "
                             "expected (B, C, h, w) and (B, 3, H, W)")
        height, width = latents.shape[-2:]
        if images.shape[-2] % height or images.shape[-1] % width:
            raise ValueError(f"images of {images.shape[-2]}x{images.shape[-1]} pixels do not split into the "
                             f"latents' {height}x{width} grid")
        targets = F.adaptive_avg_pool2d(images.double(), (height, width))  # (B, 3, h, w): area means
        x = latents.detach().double().movedim(1, -1).flatten(0, 2)  # (N, C)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (N, C+1)
        y = targets.movedim(1, -1).flatten(0, 2)  # (N, 3)
        if self.xtx is None:
            self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self.xty = torch.zeros(x.shape[1], RGB, dtype=torch.float64, device=x.device)
            self.yty = self.yty.to(x.device)
        elif x.shape[1] != self.xtx.shape[0]:
            raise ValueError(f"latents with {x.shape[1] - 1} channels cannot join a fit of "
                             f"{self.xtx.shape[0] - 1}-channel latents")
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty += (y * y).sum(dim=0)
        self.count += x.shape[0]

    @property
    def positions_needed(self) -> int:
        """Latent positions that determine the map: C + 1, one per unknown of each colour (1 before any latents)."""
        return 1 if self.xtx is None else self.xtx.shape[0]

    def solve(self) -> LatentPreview:
        """The map with the least squared error over everything added."""
        if self.count < self.positions_needed:
            raise ValueError(f"a latent preview needs at least {self.positions_needed} latent positions to fit on, "
                             f"got {self.count}")
        # gelsd: a least-squares solution even when a channel is constant (a singular system).
        solution = torch.linalg.lstsq(self.xtx.cpu(), self.xty.cpu(), driver="gelsd").solution  # (C+1, 3)
        return LatentPreview.from_tensors(solution[:-1], solution[-1])

    def psnr(self, preview: LatentPreview) -> float:
        """PSNR in dB of `preview` before clamping (which only helps) against the area-averaged images added."""
        if self.xtx is None:
            raise ValueError("nothing to measure: no latents were added")
        weights = torch.tensor([*preview.factors, preview.bias], dtype=torch.float64)  # (C+1, 3)
        xtx, xty, yty = self.xtx.cpu(), self.xty.cpu(), self.yty.cpu()
        squared_error = yty.sum() - 2 * (weights * xty).sum() + (weights * (xtx @ weights)).sum()
        mse = max(squared_error.item(), 0.0) / (self.count * RGB)
        return 10 * math.log10(4.0 / mse) if mse > 0 else math.inf  # peak to peak 2: images in [-1, 1]


def fit_latent_preview(latents: torch.Tensor, images: torch.Tensor) -> LatentPreview:
    """The least-squares map from normalised latents (B, C, h, w) to their images (B, 3, H, W) in [-1, 1] averaged
    over each latent pixel's area (see `LatentPreviewFit` for more images than fit in memory at once)."""
    fit = LatentPreviewFit()
    fit.update(latents, images)
    return fit.solve()
