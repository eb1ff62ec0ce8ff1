"""Latent diagnostics: how easily a diffusion model would learn a VAE's latent space, measured cheaply.

Reconstruction metrics say how well a VAE reconstructs; these say what its latents look like to a diffusion
model, with the transforms and the resampling of the regularisers that train for it (`vaegan.train.losses`):

- **equivariance error**: decode the latent downscaled 2× and compare with the image downscaled 2×; decode the
  latent rotated by 90° and compare with the rotated image (PSNR, LPIPS). EQ-VAE and scale equivariance lower it.
- **noise robustness**: PSNR of the decode of z + σ·std(z)·ε against the decode of z, at σ = 0.1 and 0.3: how
  much a sampler's small errors in the latent change the image.
- **latent spectrum**: the radially averaged power spectrum of the normalised latents, and the share of their
  energy above half the Nyquist frequency, next to the same for the images resized to the latent's grid.
  Latents noisier in high frequencies than images are harder to diffuse.
- **channel statistics**: per-channel mean, std and the correlation between channels (`ChannelMoments`).
- **alignment to a vision model**: the cosine of VA-VAE's loss through a least-squares 1×1 probe or a trained
  head (`linear_probe`, `alignment_cosine`; `scripts/measure_alignment.py`).

Everything takes a `decode` callable (normalised latents -> images in [-1, 1]) and tensors, so the same code
measures any codec, including the identity-like ones the tests check it with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vaegan.images.convert import to_uint8
from vaegan.images.transforms import LatentTransform, resize
from vaegan.metrics.distribution import FeatureMoments
from vaegan.metrics.reconstruction import psnr

Decode = Callable[[torch.Tensor], torch.Tensor]
LpipsNetworks = dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

# σ of the noise robustness test, in units of each image's latent std.
NOISE_LEVELS = (0.1, 0.3)
# The equivariance transforms of the diagnostics: a 2x downscale and a quarter turn.
EQUIVARIANCE_TRANSFORMS = ("scale_2x", "rotation_90")
# "Upper half of the frequencies": radial frequency above half the Nyquist frequency (0.5 cycles per pixel).
HIGH_FREQUENCY_CUTOFF = 0.25


# ---------------------------------------------------------------- per image: equivariance and noise


def equivariance_transform(kind: str, latent_size: tuple[int, int]) -> LatentTransform:
    """`scale_2x`: half the latent's size; `rotation_90`: a quarter turn counter-clockwise."""
    if kind == "scale_2x":
        return LatentTransform(size=(max(1, latent_size[0] // 2), max(1, latent_size[1] // 2)))
    if kind == "rotation_90":
        return LatentTransform(quarter_turns=1)
    raise ValueError(f"unknown equivariance transform {kind!r}; choose one of {', '.join(EQUIVARIANCE_TRANSFORMS)}")


def equivariance_errors(
    decode: Decode, images: torch.Tensor, latents: torch.Tensor, lpips_networks: LpipsNetworks
) -> dict[str, list[float]]:
    """Per image, for each transform τ in `EQUIVARIANCE_TRANSFORMS`: PSNR and LPIPS of D(τ·z) against τ·x.

    `images` (B, 3, H, W) in [-1, 1], `latents` (B, C, h, w) their normalised latents. Both sides are rounded to
    uint8 first, as every reconstruction metric here; keys `<transform>_psnr`, `<transform>_lpips_<net>`.
    """
    factor = images.shape[-1] // latents.shape[-1]
    values: dict[str, list[float]] = {}
    for kind in EQUIVARIANCE_TRANSFORMS:
        transform = equivariance_transform(kind, tuple(latents.shape[-2:]))
        target = to_uint8(transform(images, factor))
        decoded = to_uint8(decode(transform(latents)))
        values[f"{kind}_psnr"] = psnr(target, decoded).tolist()
        for net, network in lpips_networks.items():
            values[f"{kind}_lpips_{net}"] = network(_as_float(target), _as_float(decoded)).tolist()
    return values


def noise_robustness(
    decode: Decode, latents: torch.Tensor, decoded: torch.Tensor, seeds: list[int],
    levels: tuple[float, ...] = NOISE_LEVELS,
) -> dict[str, list[float]]:
    """Per image and σ in `levels`: PSNR of D(z + σ·std(z)·ε) against D(z), keys `noise_<σ>_psnr`.

    `latents` (B, C, h, w) normalised, `decoded` their uint8 decode (B, 3, H, W). std(z) is the image's own over
    all its latent elements; ε is drawn per image from a generator seeded with `seeds[i]` (the image's index in
    the data), so the values do not depend on the batch size or order.
    """
    noise = torch.stack([
        torch.randn(latent.shape, generator=torch.Generator(latents.device).manual_seed(seed), device=latents.device)
        for latent, seed in zip(latents, seeds, strict=True)
    ])  # (B, C, h, w)
    std = latents.flatten(1).std(dim=1).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return {
        f"noise_{level:g}_psnr": psnr(decoded, to_uint8(decode(latents + level * std * noise))).tolist()
        for level in levels
    }


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], what LPIPS takes."""
    return images.float() / 127.5 - 1.0


# ---------------------------------------------------------------- spectra


def power_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Mean 2-D power spectrum of (B, C, h, w) over images and channels, (h, w) float64, DC at [0, 0].

    Each (image, channel) plane has its own mean removed first, so the DC term is 0 and a constant offset (which
    the latent normalisation removes anyway) carries no energy. |FFT|² / (h·w)²: by Parseval the spectrum sums to
    the plane's mean square, its variance.
    """
    planes = x.detach().double()
    planes = planes - planes.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(planes).abs().pow(2) / (x.shape[-2] * x.shape[-1]) ** 2
    return power.mean(dim=(0, 1)).cpu()


def radial_frequencies(height: int, width: int) -> torch.Tensor:
    """|f| in cycles per pixel at every bin of an (h, w) FFT, (h, w) float64, 0 at DC up to about 0.71."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    return (fy**2 + fx**2).sqrt()


def radial_profile(power: torch.Tensor) -> tuple[list[float], list[float]]:
    """Radially averaged spectrum: frequencies k/n (k = 1 .. n/2, n the shorter side) and the mean power of the
    bins whose |f|·n rounds to k, as a share of the total power. DC is left out; so are the corners beyond the
    Nyquist frequency of the shorter side."""
    n = min(power.shape)
    ring = (radial_frequencies(*power.shape) * n).round().long()  # (h, w) ring index
    total = power.sum().clamp(min=torch.finfo(torch.float64).tiny)
    frequencies, profile = [], []
    for k in range(1, n // 2 + 1):
        mask = ring == k
        frequencies.append(k / n)
        profile.append((power[mask].mean() / total).item() if mask.any() else 0.0)
    return frequencies, profile


def high_frequency_share(power: torch.Tensor, cutoff: float = HIGH_FREQUENCY_CUTOFF) -> float:
    """The share of the (non-DC) power at |f| > `cutoff` cycles per pixel (default: above half the Nyquist
    frequency), from the 2-D spectrum: white noise gives 1 - π·cutoff² ≈ 0.80, smooth images much less."""
    total = power.sum()
    if total <= 0:
        return 0.0
    return (power[radial_frequencies(*power.shape) > cutoff].sum() / total).item()


@dataclass
class Spectra:
    """Running mean power spectra of a model's normalised latents and of its images at the latent's grid."""

    latent_sum: torch.Tensor | None = None  # (h, w)
    image_sum: torch.Tensor | None = None  # (h, w)
    count: int = 0  # images

    def update(self, latents: torch.Tensor, images: torch.Tensor) -> None:
        """Add a batch: latents (B, C, h, w), images (B, 3, H, W), resized to (h, w) as the regularisers do."""
        batch = latents.shape[0]
        latent = power_spectrum(latents) * batch
        image = power_spectrum(resize(images, tuple(latents.shape[-2:]))) * batch
        if self.latent_sum is None:
            self.latent_sum, self.image_sum = latent, image
        else:
            self.latent_sum, self.image_sum = self.latent_sum + latent, self.image_sum + image
        self.count += batch

    def summary(self) -> dict:
        """Radial profiles and high-frequency shares of both spectra (JSON types)."""
        latent, image = self.latent_sum / self.count, self.image_sum / self.count
        frequencies, latent_profile = radial_profile(latent)
        _, image_profile = radial_profile(image)
        return {
            "frequencies": frequencies,
            "latent": latent_profile,
            "image": image_profile,
            "latent_high_frequency_share": high_frequency_share(latent),
            "image_high_frequency_share": high_frequency_share(image),
            "cutoff": HIGH_FREQUENCY_CUTOFF,
        }


# ---------------------------------------------------------------- channels


@dataclass
class ChannelMoments:
    """Running mean and covariance of the latent channels, (C,) and (C, C), over every position of every image."""

    moments: FeatureMoments = field(default_factory=FeatureMoments)

    def update(self, latents: torch.Tensor) -> None:
        """Add latents (B, C, h, w): each position is one C-vector."""
        self.moments.update(latents.detach().transpose(0, 1).flatten(1).T)  # (B·h·w, C)

    def correlation(self) -> torch.Tensor:
        """Pearson correlation between channels, (C, C) float64; a constant channel correlates 0 with the rest."""
        _, covariance = self.moments.mean_and_covariance()
        std = covariance.diagonal().clamp(min=0).sqrt()
        scale = torch.outer(std, std)
        correlation = torch.where(scale > 0, covariance / scale.clamp(min=1e-300), torch.zeros_like(covariance))
        return correlation.fill_diagonal_(1.0)


def max_offdiagonal(correlation: torch.Tensor) -> float:
    """The largest |correlation| between two different channels (0 for a single channel)."""
    if correlation.shape[0] < 2:
        return 0.0
    mask = ~torch.eye(correlation.shape[0], dtype=torch.bool)
    return correlation.abs()[mask].max().item()


# ---------------------------------------------------------------- alignment to a vision model


def linear_probe(latents: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares 1×1 projection from latents to vision features: weight (D, C) and bias (D,), float64.

    `latents` (B, C, h, w) are resized to the features' grid (B, D, g, g') first, as VA-VAE's loss does, and every
    position is one sample. It measures how linearly a latent space already holds the features, for a model
    trained without alignment as well as with it.
    """
    x = _positions(resize(latents.double(), tuple(features.shape[-2:])))  # (N, C)
    y = _positions(features.double())  # (N, D)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(x, y).solution  # (C + 1, D)
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def alignment_cosine(
    latents: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cosine per image (B,) between W·z + b at every position (resized to the features' grid) and the
    feature there: the first term of VA-VAE's loss without its margin. `weight` (D, C) or a 1×1 conv's (D, C, 1, 1).
    """
    weight = weight.double().reshape(weight.shape[0], -1)
    z = resize(latents.double(), tuple(features.shape[-2:]))  # (B, C, g, g')
    projected = torch.einsum("dc,bchw->bdhw", weight, z)
    if bias is not None:
        projected = projected + bias.double().view(1, -1, 1, 1)
    return torch.nn.functional.cosine_similarity(projected, features.double(), dim=1).mean(dim=(1, 2))


def _positions(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B·h·w, C)."""
    return x.transpose(0, 1).flatten(1).T
