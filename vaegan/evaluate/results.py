"""What an evaluation measured, as data: per model, per image, and the sheets' images."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vaegan.autoencoder.normalization import LatentNormalization, LatentStatistics
from vaegan.images.readers import Skip
from vaegan.metrics.diagnostics import (
    EQUIVARIANCE_TRANSFORMS,
    NOISE_LEVELS,
    ChannelMoments,
    Spectra,
)

METRIC_TITLES = {"psnr": "PSNR", "ssim": "SSIM", "ms_ssim": "MS-SSIM"}


@dataclass
class ModelResult:
    """Everything measured for one model besides the per-image rows."""

    label: str
    path: str
    parameters: int
    latent_shape: tuple[int, int, int]  # (C, h, w) at the evaluation resolution
    bits_per_pixel: float
    normalization: LatentNormalization
    statistics: LatentStatistics = field(default_factory=LatentStatistics)  # of the raw latents z
    normalised_statistics: LatentStatistics = field(default_factory=LatentStatistics)  # what a diffusion model sees
    codec_seconds: float = 0.0  # encode + decode, summed over batches
    rfid: float | None = None
    channels: ChannelMoments = field(default_factory=ChannelMoments)  # of the raw latents z
    spectra: Spectra = field(default_factory=Spectra)  # of the normalised latents, and the images at their grid
    diagnostics_seconds: float = 0.0


@dataclass
class SheetImage:
    """One image kept for the comparison sheets: the original and every model's reconstruction, uint8."""

    index: int
    name: str
    selected: str  # why it is shown: "evenly spaced" or "worst PSNR"
    original: torch.Tensor  # (3, R, R) uint8
    reconstructions: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> (3, R, R) uint8
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> {"psnr": ..., ...}


@dataclass
class EvaluationResult:
    """What `evaluate` measured; `vaegan.evaluate.report` turns it into files."""

    data: str
    resolution: int
    device: str
    dtype: str
    models: list[ModelResult]
    rows: list[dict[str, Any]]  # one per (model, image): {"model", "image", "psnr", "ssim", "ms_ssim", ...}
    lpips: dict[str, str]  # net -> where its backbone came from
    ms_ssim_note: str | None  # why MS-SSIM is n/a, or None
    rfid_network: str | None  # which Inception, or None when rFID was skipped
    rfid_note: str | None  # why rFID is missing, or a caveat about it
    skipped: list[Skip]
    sheets: list[SheetImage]
    seconds: float
    diagnostics: bool = False  # whether the latent diagnostics were measured

    @property
    def num_images(self) -> int:
        return len({row["image"] for row in self.rows})

    @property
    def metric_columns(self) -> list[str]:
        return ["psnr", "ssim", "ms_ssim", *(f"lpips_{net}" for net in self.lpips)]

    @property
    def diagnostic_columns(self) -> list[str]:
        """The per-image latent diagnostics in the rows: equivariance PSNR and LPIPS, noise robustness PSNR."""
        if not self.diagnostics:
            return []
        equivariance = [f"{kind}_{metric}" for kind in EQUIVARIANCE_TRANSFORMS
                        for metric in ("psnr", *(f"lpips_{net}" for net in self.lpips))]
        return [*equivariance, *(f"noise_{level:g}_psnr" for level in NOISE_LEVELS)]


def metric_title(column: str) -> str:
    """"lpips_alex" -> "LPIPS-alex": the backbone is always named, the numbers differ between them."""
    return METRIC_TITLES.get(column) or f"LPIPS-{column.removeprefix('lpips_')}"


def finite_or_none(value: float | None) -> float | None:
    """JSON has no inf/NaN: PSNR of an exact reconstruction (inf) is reported as null."""
    return value if value is not None and math.isfinite(value) else None


def aggregate(values: list[float | None]) -> dict[str, float | None] | None:
    """mean, std, min, max over images (None when the metric is n/a); inf values (exact copies) count."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    array = np.asarray(present, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        stats = {"mean": array.mean(), "std": array.std(), "min": array.min(), "max": array.max()}
    return {key: finite_or_none(float(value)) for key, value in stats.items()}


def model_rows(result: EvaluationResult, label: str) -> list[dict[str, Any]]:
    return [row for row in result.rows if row["model"] == label]
