"""Metrics against independent references: closed-form PSNR, scikit-image's SSIM, pooled statistics."""

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import structural_similarity

from vaegan.autoencoder.normalization import LatentNormalization, LatentStatistics
from vaegan.images.convert import to_uint8
from vaegan.metrics.reconstruction import psnr, ssim


def _photo() -> torch.Tensor:
    return torch.from_numpy(data.astronaut()[::4, ::4].copy()).permute(2, 0, 1)[None]  # (1, 3, 128, 128)


def test_psnr_of_a_known_error():
    reference = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    reconstruction = reference.clone()
    reconstruction[0] += 5  # MSE 25 -> 10 log10(255^2 / 25) dB
    reconstruction[1, :, ::2] += 10  # MSE 50
    expected = [10 * math.log10(255**2 / 25), 10 * math.log10(255**2 / 50)]
    assert psnr(reference, reconstruction).tolist() == pytest.approx(expected, abs=1e-4)
    assert psnr(reference, reference).isinf().all()


def test_to_uint8_maps_the_range_ends():
    assert to_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]


def test_ssim_matches_scikit_image_and_is_one_for_identical_images():
    reference = _photo()
    noisy = (reference.float() + torch.randn(reference.shape, generator=torch.Generator().manual_seed(0)) * 20)
    noisy = noisy.clamp(0, 255).to(torch.uint8)
    expected = structural_similarity(
        reference[0].permute(1, 2, 0).numpy(), noisy[0].permute(1, 2, 0).numpy(),
        channel_axis=2, gaussian_weights=True, sigma=1.5, data_range=255,
    )
    assert ssim(reference, noisy).item() == pytest.approx(expected, abs=1e-6)
    assert ssim(reference, reference).item() == pytest.approx(1.0)


def test_latent_statistics_match_a_single_pass_and_suggest_unit_variance():
    rng = np.random.default_rng(0)
    latents = torch.from_numpy(rng.normal(0.3, 2.0, size=(10, 4, 6, 6)))
    statistics = LatentStatistics()
    for chunk in latents.split(3):
        statistics.update(chunk)
    per_channel = latents.transpose(0, 1).flatten(1)
    assert statistics.mean.numpy() == pytest.approx(per_channel.mean(1).numpy())
    assert statistics.channel_std.numpy() == pytest.approx(per_channel.std(1).numpy())
    normalization = LatentNormalization.fit(statistics, "scalar", "shift")
    assert normalization.shift_factor == pytest.approx(latents.mean().item())
    assert normalization.normalize(latents).std().item() == pytest.approx(1.0)
    scale_only = LatentNormalization.fit(statistics, "scalar", "scale")
    assert (scale_only.scaling_factor, scale_only.shift_factor) == (pytest.approx(normalization.scaling_factor), 0.0)
