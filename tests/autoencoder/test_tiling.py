"""Exact tiling: tiled encode and decode equal the untiled network, for every architecture and stash budget."""

import math

import pytest
import torch
import torch.nn.functional as F

from vaegan import AutoencoderKL, preset
from vaegan.autoencoder.exact_tiling import Box, ExactTiling, Moments, decode_exact, decoder_graph, encode_exact, spans

# SD-shaped (f8, mid attention, 3 resnets per decoder level) but narrow, so that each case takes a second or two.
NARROW = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8)
ARCHITECTURES = {
    "mini": preset("mini"),
    "sd": preset("sd", **NARROW),                                         # quant convs
    "flux": preset("flux", **NARROW),                                     # 16 channels, no quant convs
    "no-attention": preset("sd3", **NARROW, mid_block_add_attention=False),
}
# Equal up to float32 rounding; one tile's statistics instead of the image's are off by ~1 (see `test_...`).
EXACT = dict(rtol=1e-5, atol=3e-5)


def vae_of(name: str) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(ARCHITECTURES[name]).eval()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_tiled_decode_equals_untiled(name):
    vae = vae_of(name)
    z = torch.randn(2, vae.config.latent_channels, 13, 19)  # neither side a multiple of the tile
    with torch.no_grad():
        expected = vae.decode(z)
    torch.testing.assert_close(decode_exact(vae, z, tile=5), expected, **EXACT)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_tiled_encode_equals_untiled(name):
    vae = vae_of(name)
    factor = vae.config.downsampling_factor
    x = torch.rand(2, 3, 11 * factor, 7 * factor) * 2 - 1
    with torch.no_grad():
        expected = vae.moments(x)
    torch.testing.assert_close(encode_exact(vae, x, tile=4), expected, **EXACT)


@pytest.mark.parametrize("name", ["mini", "sd"])
def test_recomputing_everything_is_exact_too(name):
    # A budget of 0 keeps only the attention's input and output: every sweep recomputes from them.
    vae = vae_of(name)
    factor = vae.config.downsampling_factor
    z = torch.randn(1, vae.config.latent_channels, 5, 6)
    x = torch.rand(1, 3, 5 * factor, 6 * factor) * 2 - 1
    with torch.no_grad():
        decoded, moments = vae.decode(z), vae.moments(x)
    torch.testing.assert_close(decode_exact(vae, z, tile=3, stash_budget=0), decoded, **EXACT)
    torch.testing.assert_close(encode_exact(vae, x, tile=3, stash_budget=0), moments, **EXACT)


def test_per_tile_statistics_would_not_be_exact():
    # What the merged statistics fix: the same tiles normalised on their own differ from the untiled decode.
    vae = vae_of("mini")
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        expected = vae.decode(z)
        one_tile = vae.decode(z[:, :, :8, :8])
    assert (one_tile - expected[:, :, :32, :32]).abs().max() > 1e-2
    torch.testing.assert_close(decode_exact(vae, z, tile=8), expected, **EXACT)


def test_channels_last_model_and_single_tile_and_one_pixel_tiles():
    vae = vae_of("sd").to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = vae.decode(z)
    for tile in (1, 4, 64):
        torch.testing.assert_close(decode_exact(vae, z, tile=tile), expected, **EXACT)


def sd_decode_without_a_budget() -> tuple[AutoencoderKL, torch.Tensor, torch.Tensor, ExactTiling]:
    """The narrow SD VAE, latents, their untiled decode, and an exact tiling of them without a budget, run."""
    vae = vae_of("sd")
    z = torch.randn(1, 4, 8, 6)
    with torch.no_grad():
        expected = vae.decode(z)
        unlimited = ExactTiling(decoder_graph(vae), z, tile=3)
        torch.testing.assert_close(unlimited.run(), expected, **EXACT)
    return vae, z, expected, unlimited


def test_budget_bounds_the_stashes_and_the_result_stays_exact():
    vae, z, expected, unlimited = sd_decode_without_a_budget()
    budget = unlimited.peak_stash_bytes // 3
    limited = ExactTiling(decoder_graph(vae), z, tile=3, stash_budget=budget)
    torch.testing.assert_close(limited.run(), expected, **EXACT)
    assert 0 < limited.peak_stash_bytes <= budget


def test_fp16_stashes_hold_twice_the_activations_in_a_budget_and_stay_close():
    vae, z, expected, unlimited = sd_decode_without_a_budget()
    budget = unlimited.peak_stash_bytes // 2
    fp32 = ExactTiling(decoder_graph(vae), z, tile=3, stash_budget=budget)
    fp16 = ExactTiling(decoder_graph(vae), z, tile=3, stash_budget=budget, stash_dtype=torch.float16)
    # Half the bytes: within half the budget fp16 keeps every activation, fp32 must recompute some.
    assert fp16.plan.macs == unlimited.plan.macs < fp32.plan.macs
    with torch.no_grad():
        images = fp16.run()
    assert 0 < fp16.peak_stash_bytes <= budget
    assert images.dtype == torch.float32
    # Rounded to 11 significant bits where kept: above the 60 dB that counts as exact for tiling (69 dB here),
    # below the ~120 dB of fp32 stashes.
    psnr = 10 * math.log10(4 / (images - expected).square().mean().item())
    assert 60 < psnr < 100


def test_fp16_stash_beyond_its_range_raises_instead_of_keeping_inf():
    vae = vae_of("sd")
    z = 1e6 * torch.randn(1, 4, 4, 4)  # the convs before the first GroupNorm pass it on far above 65504
    with torch.no_grad():
        assert torch.isfinite(vae.decode(z)).all()  # fine in fp32: GroupNorm rescales it
    with pytest.raises(OverflowError, match=r"activation \d+ .*float16's range.*wider stash_dtype"):
        decode_exact(vae, z, tile=2, stash_dtype=torch.float16)


def tile_moments(x: torch.Tensor, rows: int, cols: int) -> Moments:
    """x's moments gathered tile by tile, over the cores of `rows` x `cols` tiles."""
    moments, whole = Moments(), Box.whole(*x.shape[2:])
    for top, bottom in spans(x.shape[2], rows):
        for left, right in spans(x.shape[3], cols):
            moments.add(Box(top, bottom, left, right, *x.shape[2:]).of(x, whole))
    return moments


def test_merged_tile_moments_give_group_norm():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(3, 12, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = 0.5 + 2.0 * torch.randn(2, 12, 17, 23)
    scale, shift = tile_moments(x, 5, 6).affine(norm)
    with torch.no_grad():
        expected = F.group_norm(x, 3, norm.weight, norm.bias, eps=1e-6)
    torch.testing.assert_close(x * scale + shift, expected, rtol=1e-5, atol=1e-5)


def test_merged_tile_moments_keep_a_small_variance_under_a_large_mean():
    # Where sums of squares in float32 would lose the variance entirely; compare with float64 statistics.
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(3, 12, eps=1e-6)
    x = 100.0 + 0.01 * torch.randn(2, 12, 17, 23)
    scale, shift = tile_moments(x, 5, 6).affine(norm)
    variance, mean = torch.var_mean(x.double().view(2, 3, -1), dim=-1, correction=0)     # (B, G)
    expected = torch.rsqrt(variance + 1e-6).repeat_interleave(4, dim=1)                  # (B, C)
    torch.testing.assert_close(scale.flatten(1).double(), expected, rtol=2e-5, atol=0)
    torch.testing.assert_close(shift.flatten(1).double(), -mean.repeat_interleave(4, dim=1) * expected,
                               rtol=2e-5, atol=0)


def test_spans_partition_the_axis_into_near_equal_tiles():
    assert spans(13, 5) == [(0, 4), (4, 9), (9, 13)]
    assert spans(4, 5) == [(0, 4)]
    assert spans(12, 4) == [(0, 4), (4, 8), (8, 12)]


def test_bad_inputs_are_named():
    vae = vae_of("mini")
    with pytest.raises(ValueError, match="multiples of the downsampling factor 4"):
        encode_exact(vae, torch.zeros(1, 3, 30, 32), tile=4)
    with pytest.raises(ValueError, match=r"expected \(B, 4, h, w\)"):
        decode_exact(vae, torch.zeros(1, 3, 8, 8), tile=4)
    with pytest.raises(ValueError, match="tile=0 must be at least 1"):
        decode_exact(vae, torch.zeros(1, 4, 8, 8), tile=0)
