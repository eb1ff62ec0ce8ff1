"""How latents are normalised for a diffusion model, and back: the one place that knows the formula.

A diffusion model trains on `z_model = (z - shift_factor) * scaling_factor` (diffusers' convention; SD and SDXL
leave the shift at 0), where z is the VAE's raw latent; pipelines decode `z = z_model / scaling_factor +
shift_factor`. The codec, dataset encoding and its shards, `LatentDataset`, `vaegan decode`, evaluation,
training validation and export all go through `LatentNormalization`, so a change of convention is one change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from vaegan.autoencoder import AutoencoderConfig
from vaegan.metrics import LatentStatistics

# "shift" (SD3, Flux): zero mean and unit variance; "scale" (SD 1.x, SDXL): shift 0, unit variance of z / std.
Convention = Literal["shift", "scale"]


@dataclass(frozen=True)
class LatentNormalization:
    """z_model = (z - shift_factor) * scaling_factor, and its inverse."""

    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @classmethod
    def of(cls, config: AutoencoderConfig) -> LatentNormalization:
        """The normalisation a VAE's config declares (a missing shift is 0, as diffusers reads it)."""
        return cls(config.scaling_factor, config.shift_factor or 0.0)

    @classmethod
    def fit(cls, statistics: LatentStatistics, convention: Convention = "shift") -> LatentNormalization:
        """The normalisation that gives latents with these statistics unit variance (and zero mean for "shift")."""
        if convention not in ("shift", "scale"):
            raise ValueError(f"convention must be 'shift' or 'scale', got {convention!r}")
        mean, std = statistics.overall()
        return cls(1.0 / std, mean if convention == "shift" else 0.0)

    @classmethod
    def from_json(cls, data: dict) -> LatentNormalization:
        """Read what `to_json` wrote (a manifest, a shard's metadata)."""
        return cls(data["scaling_factor"], data["shift_factor"])

    def to_json(self) -> dict:
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    def into(self, config: AutoencoderConfig) -> AutoencoderConfig:
        """`config` declaring this normalisation, for an exported VAE."""
        return config.replace(scaling_factor=self.scaling_factor, shift_factor=self.shift_factor)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, h, w) -> what a diffusion model sees."""
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """What a diffusion model sees (B, C, h, w) -> raw latents for the decoder."""
        return latents / self.scaling_factor + self.shift_factor

    def normalize_logvar(self, logvar: torch.Tensor) -> torch.Tensor:
        """A posterior's log-variance in the normalised space: the variance scales by scaling_factor^2."""
        return logvar + 2.0 * math.log(abs(self.scaling_factor))

    def __str__(self) -> str:
        return f"(z - {self.shift_factor:g}) * {self.scaling_factor:g}"
