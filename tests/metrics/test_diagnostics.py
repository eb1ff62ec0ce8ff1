"""Latent diagnostics against independent computations: spectra of known patterns, the equivariance error and the
noise robustness of identity-like codecs, channel correlation against numpy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vaegan.images.convert import to_uint8
from vaegan.metrics.diagnostics import (
    ChannelMoments,
    Spectra,
    alignment_cosine,
    equivariance_errors,
    high_frequency_share,
    linear_probe,
    max_offdiagonal,
    noise_robustness,
    power_spectrum,
    radial_frequencies,
    radial_profile,
)
from vaegan.metrics.reconstruction import psnr


def cosine_pattern(n: int, k: int, channels: int = 2) -> torch.Tensor:
    """cos(2π k x / n) along the width, the same in every row: (1, C, n, n)."""
    x = torch.arange(n, dtype=torch.float64)
    return torch.cos(2 * math.pi * k * x / n).expand(1, channels, n, n)


@pytest.mark.parametrize("k", [3, 5, 12])
def test_the_spectrum_of_a_cosine_is_one_ring(k):
    n = 32
    power = power_spectrum(cosine_pattern(n, k) + 0.7)  # the offset is removed with the mean
    frequencies, profile = radial_profile(power)
    assert frequencies[k - 1] == k / n
    assert [i + 1 for i, value in enumerate(profile) if value > 1e-12] == [k]
    # All the power sits in the two bins (0, ±k) of ring k, so that ring's mean is the total / its bin count.
    ring_bins = int(((radial_frequencies(n, n) * n).round() == k).sum())
    assert profile[k - 1] == pytest.approx(1 / ring_bins)
    assert high_frequency_share(power) == pytest.approx(1.0 if k / n > 0.25 else 0.0, abs=1e-12)
    # Parseval: the spectrum sums to the variance of the plane, 1/2 for a unit cosine.
    assert power.sum().item() == pytest.approx(0.5)


def test_white_noise_spreads_its_power_over_the_plane():
    n = 32
    noise = torch.randn(64, 4, n, n, generator=torch.Generator().manual_seed(0))
    frequencies = radial_frequencies(n, n)
    # Independently: the share of the non-DC bins above 0.25 cycles per pixel (about 1 - π/16 of the plane).
    expected = ((frequencies > 0.25).sum() / (n * n - 1)).item()
    assert high_frequency_share(power_spectrum(noise)) == pytest.approx(expected, abs=0.01)
    _, profile = radial_profile(power_spectrum(noise))
    assert max(profile) / min(profile) < 1.3  # flat


def test_smooth_images_have_little_high_frequency_power():
    spectra = Spectra()
    smooth = F.interpolate(torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)), size=(64, 64),
                           mode="bicubic", align_corners=False)
    white = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    spectra.update(white, smooth)  # latents 16x16: the images are resized to that grid
    summary = spectra.summary()
    assert summary["image_high_frequency_share"] < 0.1 < 0.7 < summary["latent_high_frequency_share"]
    assert len(summary["frequencies"]) == len(summary["latent"]) == len(summary["image"]) == 8


def test_the_identity_codec_is_exactly_equivariant():
    images = to_uint8(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    images = images.float() / 127.5 - 1  # exact uint8 values, as evaluation reads them

    def lpips(x, y):  # a stand-in distance with the LPIPS signature: mean squared difference per image
        return (x - y).pow(2).mean(dim=(1, 2, 3))

    values = equivariance_errors(lambda z: z, images, images, {"mse": lpips})
    assert values["scale_2x_psnr"] == [math.inf, math.inf] and values["rotation_90_psnr"] == [math.inf, math.inf]
    assert values["scale_2x_lpips_mse"] == [0.0, 0.0] and values["rotation_90_lpips_mse"] == [0.0, 0.0]


def test_rotation_error_of_a_pooling_codec_is_its_reconstruction_error():
    # z = 2x2 average, D = nearest upsampling: both commute with a quarter turn, so decoding the rotated latent
    # errs exactly as the plain reconstruction does, image by image.
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = F.avg_pool2d(images, 2)

    def decode(z):
        return z.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)

    values = equivariance_errors(decode, images, latents, {})
    reconstruction = psnr(to_uint8(images), to_uint8(decode(latents)))
    assert values["rotation_90_psnr"] == pytest.approx(reconstruction.tolist(), abs=1e-5)
    assert set(values) == {"scale_2x_psnr", "rotation_90_psnr"}
    # Downscaled, the same codec loses less detail (its 2x2 blocks cover more of the smaller image's content).
    assert all(s > r for s, r in zip(values["scale_2x_psnr"], reconstruction.tolist(), strict=True))


def test_noise_robustness_of_the_identity_codec():
    # Latents in [-0.6, 0.6] with std s; noise sigma * s * eps in image units; in uint8 steps its std is
    # 127.5 * sigma * s, plus the rounding of both sides (variance 2/12).
    generator = torch.Generator().manual_seed(0)
    latents = (torch.rand(8, 3, 64, 64, generator=generator) * 1.2 - 0.6)
    std = latents.flatten(1).std(dim=1)
    decoded = to_uint8(latents)
    values = noise_robustness(lambda z: z, latents, decoded, seeds=list(range(8)), levels=(0.1, 0.3))
    for level in (0.1, 0.3):
        expected = [10 * math.log10(255**2 / ((127.5 * level * s) ** 2 + 2 / 12)) for s in std.tolist()]
        assert values[f"noise_{level:g}_psnr"] == pytest.approx(expected, abs=0.15)
    # Seeded by image index: the same image gets the same noise in any batch.
    alone = noise_robustness(lambda z: z, latents[3:4], decoded[3:4], seeds=[3], levels=(0.3,))
    assert alone["noise_0.3_psnr"] == [values["noise_0.3_psnr"][3]]


def test_channel_correlation_matches_numpy():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 1, 8, 8, generator=generator, dtype=torch.float64)
    latents = torch.cat([base, -2 * base + 0.1 * torch.randn(6, 1, 8, 8, generator=generator, dtype=torch.float64),
                         torch.randn(6, 2, 8, 8, generator=generator, dtype=torch.float64)], dim=1)  # (6, 4, 8, 8)
    moments = ChannelMoments()
    for chunk in latents.split(4):
        moments.update(chunk)
    expected = np.corrcoef(latents.transpose(0, 1).flatten(1).numpy())
    np.testing.assert_allclose(moments.correlation().numpy(), expected, atol=1e-10)
    assert max_offdiagonal(moments.correlation()) == pytest.approx(abs(expected[0, 1]))
    assert max_offdiagonal(moments.correlation()) > 0.99


def test_a_linear_probe_recovers_a_linear_map_and_its_cosine_is_one():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 6, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    features = torch.einsum("dc,bchw->bdhw", weight, latents) + bias.view(1, -1, 1, 1)  # (3, 5, 6, 6)
    fitted_weight, fitted_bias = linear_probe(latents, features)
    torch.testing.assert_close(fitted_weight, weight)
    torch.testing.assert_close(fitted_bias, bias)
    assert alignment_cosine(latents, features, fitted_weight, fitted_bias).tolist() == pytest.approx([1.0] * 3)
    # Unrelated features: a probe fitted on them explains little.
    noise = torch.randn(3, 5, 6, 6, generator=generator, dtype=torch.float64)
    assert alignment_cosine(latents, noise, *linear_probe(latents, noise)).mean() < 0.5
    # A 1x1 conv's weight (D, C, 1, 1) is read the same way.
    conv_weight = weight.view(5, 4, 1, 1)
    assert alignment_cosine(latents, features, conv_weight, bias).tolist() == pytest.approx([1.0] * 3)
