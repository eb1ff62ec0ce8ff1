"""Reconstruction metrics, one implementation for training validation and for evaluation.

Conventions follow the papers (REFERENCE.md §4): images are compared as uint8 in [0, 255], PSNR is computed
per image and then averaged, SSIM uses an 11-tap Gaussian window (sigma 1.5) on each RGB channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255], rounded as a PNG writer would."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,) of uint8 images (B, C, H, W); identical images give +inf."""
    error = (reference.double() - reconstruction.double()).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(255.0**2 / error)).float()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) of uint8 images (B, C, H, W): Wang et al. 2004 with the 11-tap Gaussian window.

    Statistics are taken over the valid region only (no padding), per channel, then averaged, as in
    scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5, data_range=255)`.
    """
    x, y = reference.double(), reconstruction.double()
    channels = x.shape[1]
    window = _gaussian_window().to(x.device)
    # A separable blur: a (C, 1, 11, 1) pass then a (C, 1, 1, 11) pass, each channel on its own.
    vertical = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    horizontal = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(image, vertical, groups=channels), horizontal, groups=channels)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = blur(x), blur(y)
    # Sample (not population) covariances, the convention of the original SSIM code and scikit-image.
    n = window.numel() ** 2
    correction = n / (n - 1)
    var_x = (blur(x * x) - mu_x**2) * correction
    var_y = (blur(y * y) - mu_y**2) * correction
    cov_xy = (blur(x * y) - mu_x * mu_y) * correction
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).float()


@dataclass
class LatentStatistics:
    """Running per-channel mean and variance of latents (Chan et al.'s parallel update), in float64."""

    count: int = 0
    mean: torch.Tensor | None = None  # (C,)
    m2: torch.Tensor | None = None    # (C,) sum of squared deviations

    def update(self, latents: torch.Tensor) -> None:
        """Add a batch of latents (B, C, h, w)."""
        values = latents.detach().double().transpose(0, 1).flatten(1)  # (C, N)
        batch_mean = values.mean(dim=1)
        batch_m2 = ((values - batch_mean[:, None]) ** 2).sum(dim=1)
        self.merge(LatentStatistics(values.shape[1], batch_mean, batch_m2))

    def merge(self, other: LatentStatistics) -> None:
        """Fold in statistics gathered elsewhere (another batch, another rank)."""
        if other.mean is None:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * other.count / total
        self.m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / total
        self.count = total

    @property
    def channel_std(self) -> torch.Tensor:
        return (self.m2 / max(self.count - 1, 1)).sqrt()

    def overall(self) -> tuple[float, float]:
        """Mean and standard deviation over all channels pooled together."""
        mean = self.mean.mean()
        pooled_m2 = self.m2.sum() + (self.count * (self.mean - mean) ** 2).sum()
        std = (pooled_m2 / max(self.count * self.mean.numel() - 1, 1)).sqrt()
        return mean.item(), std.item()

    def suggested_factors(self, convention: str = "shift") -> tuple[float, float]:
        """(scaling_factor, shift_factor) that give latents zero mean and unit variance.

        `convention="shift"` (SD3, Flux) removes the mean: z_model = (z - mean) / std.
        `convention="scale"` (SD 1.x, SDXL) keeps shift 0 and scales by 1/std, as 0.18215 was measured.
        """
        mean, std = self.overall()
        if convention == "shift":
            return 1.0 / std, mean
        if convention == "scale":
            return 1.0 / std, 0.0
        raise ValueError(f"convention must be 'shift' or 'scale', got {convention!r}")
