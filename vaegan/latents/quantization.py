"""uint8 latents (`vaegan encode --latent_dtype uint8`): a quarter of fp32's bytes, half of fp16's.

Each stored column (mean, logvar or latent) gets one affine map per channel, value = low + q * step with q in
0..255, as public int8 ImageNet-latent sets store theirs. The maps must be fixed before any shard is written and
shared by every shard of the run, so they are measured once, on the first `CALIBRATION_IMAGES` images of the
source: each channel's range there, widened by `MARGIN` of it on both sides for the images that come later.
Values outside are clipped, and counted. What the quantisation costs is measured on the same images: the VAE's
decode of the quantised means against its decode of the exact ones, in PSNR.

The maps go into the manifest ("quantization") and into every shard's metadata, so a shard decodes alone. The
first process to claim the output folder writes them; every other process, and every rerun, uses those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vaegan.autoencoder.codec import Codec
from vaegan.latents.sources import ImageBatch

CALIBRATION_IMAGES = 64
# Of each channel's calibrated range, added on both sides: later images reach past the first ones' extremes.
MARGIN = 0.1
# Images decoded twice (exact and quantised latents) to measure the cost: decoding is the expensive half.
COST_IMAGES = 8


@dataclass(frozen=True)
class ChannelAffine:
    """value = low[c] + q * step[c], q in 0..255, for channel c."""

    low: tuple[float, ...]
    step: tuple[float, ...]

    @classmethod
    def spanning(cls, low: torch.Tensor, high: torch.Tensor) -> ChannelAffine:
        """The map covering [low, high] per channel, widened by `MARGIN` of the range on both sides."""
        span = (high - low).clamp_min(1e-6)
        low, high = low - MARGIN * span, high + MARGIN * span
        return cls(tuple(low.tolist()), tuple(((high - low) / 255).tolist()))

    def quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) finite floats -> uint8 codes, and how many values were clipped to the range (a tensor
        on their device, so that asking does not wait for it)."""
        low, step = self._as(values)
        codes = ((values.float() - low) / step).round()
        clipped = ((codes < 0) | (codes > 255)).sum()
        return codes.clamp(0, 255).to(torch.uint8), clipped

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """Stored (C, h, w) codes -> float32 values."""
        low = np.asarray(self.low, np.float32)[:, None, None]
        step = np.asarray(self.step, np.float32)[:, None, None]
        return codes.astype(np.float32) * step + low

    def dequantize_tensor(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) codes -> float32 values, on their device."""
        low, step = self._as(codes)
        return codes.float() * step + low

    def _as(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, len(self.low), 1, 1)
        low = torch.tensor(self.low, dtype=torch.float32, device=like.device).view(shape)
        step = torch.tensor(self.step, dtype=torch.float32, device=like.device).view(shape)
        return low, step

    def to_json(self) -> dict:
        return {"low": list(self.low), "step": list(self.step)}

    @classmethod
    def from_json(cls, data: dict) -> ChannelAffine:
        return cls(tuple(data["low"]), tuple(data["step"]))


def column_maps(quantization: dict | None) -> dict[str, ChannelAffine]:
    """The per-column maps of a manifest's or shard's "quantization" entry ({} for float latents)."""
    if not quantization:
        return {}
    return {name: ChannelAffine.from_json(value) for name, value in quantization["columns"].items()}


@torch.inference_mode()
def calibrate(codec: Codec, batches: list[ImageBatch], store: str) -> dict:
    """The "quantization" entry of a run's manifest, measured on `batches` (the source's first images, as the run
    will encode them): the maps of each stored column, and the cost of the quantisation."""
    columns: dict[str, list[torch.Tensor]] = {}
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (normalised means, images) of the first few, for the cost
    normalization = codec.normalization
    images = 0
    for batch in batches:
        batch, _, _ = batch.on_device(codec.device)
        if not len(batch):
            continue
        posterior = codec.posterior(batch.pixels)
        mean = normalization.normalize(posterior.mean).float()
        stored = {"mean": mean, "logvar": normalization.normalize_logvar(posterior.logvar).float()} \
            if store == "posterior" else {"latent": mean}
        for name, value in stored.items():
            finite = value.isfinite().flatten(1).all(1)
            columns.setdefault(name, []).append(value[finite].transpose(0, 1).flatten(1))  # (C, values)
        if images < COST_IMAGES:
            kept.append((mean, batch.pixels))
        images += len(batch)
    if not columns or not any(value.numel() for value in columns["mean" if store == "posterior" else "latent"]):
        raise ValueError("--latent_dtype uint8 calibrates on the source's first images, but none could be encoded")
    maps = {}
    for name, parts in columns.items():
        values = torch.cat(parts, dim=1)
        maps[name] = ChannelAffine.spanning(values.min(dim=1).values, values.max(dim=1).values)
    return {
        "kind": "per-channel affine: value = low + q * step, q in 0..255",
        "columns": {name: affine.to_json() for name, affine in maps.items()},
        "calibration_images": images,
        "cost": _cost(codec, maps["mean" if store == "posterior" else "latent"], kept),
    }


def _cost(codec: Codec, affine: ChannelAffine, kept: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """PSNR of the decode of quantised latents against the decode of exact ones; RMSE of the latents."""
    squared, values, latent_error, count = 0.0, 0, 0.0, 0
    for mean, _ in kept:
        codes, _ = affine.quantize(mean)
        quantised = affine.dequantize_tensor(codes)
        exact = codec.decode(mean, output="uint8").float()
        approximate = codec.decode(quantised, output="uint8").float()
        squared += float(((exact - approximate) ** 2).sum())
        values += exact.numel()
        latent_error += float(((quantised - mean) ** 2).sum())
        count += mean.numel()
    mse = squared / max(values, 1)
    return {
        "images": sum(len(mean) for mean, _ in kept),
        "decode_psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse > 0 else None,  # None: no change
        "latent_rmse": math.sqrt(latent_error / max(count, 1)),
    }
