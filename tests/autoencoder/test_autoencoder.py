"""The network on its own: presets, shapes, and the posterior's arithmetic."""

import math

import pytest
import torch
import torch.nn.functional as F

from vaegan import PRESETS, AutoencoderConfig, AutoencoderKL, DiagonalGaussian, preset
from vaegan.autoencoder.network import Upsample2D


def test_the_renamed_tiny_preset_still_loads_with_a_warning():
    with pytest.warns(FutureWarning, match="'tiny' is now called 'mini'"):
        renamed = preset("tiny", latent_channels=8)
    assert renamed == preset("mini", latent_channels=8)


def test_sd_preset_has_the_released_parameter_count():
    # The released SD 1.x VAE (and SDXL's, the same network) has 83,653,863 parameters.
    assert AutoencoderKL.from_preset("sd").num_parameters() == 83_653_863


def test_flux_preset_is_f8_with_16_channels_and_no_quant_convs():
    vae = AutoencoderKL.from_preset("flux")
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert vae.config.downsampling_factor == 8 and vae.config.latent_channels == 16
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)


@pytest.mark.parametrize("name", ["mini", "sd"])
def test_shapes(name):
    config = preset(name, block_out_channels=(32, 64, 64), norm_num_groups=8) if name == "sd" else preset(name)
    vae = AutoencoderKL(config)
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    posterior = vae.encode(x)
    f = config.downsampling_factor
    assert posterior.mean.shape == (2, config.latent_channels, 48 // f, 64 // f)
    assert vae.decode(posterior.mode()).shape == x.shape


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_as_a_transposed_conv_equals_interpolate_then_conv_with_the_same_gradients(channels_last):
    # Upsample2D never builds the doubled image; it must give what diffusers computes, forward and backward,
    # with the weights in either memory format (the codec turns them channels_last on a CPU).
    torch.manual_seed(0)
    upsample = Upsample2D(6)
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        upsample.to(memory_format=torch.channels_last)
        assert upsample.transposed_kernel().is_contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ours = upsample(x)
    theirs = upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert ours.shape == (2, 6, 10, 14)
    assert ours.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    upstream = torch.randn_like(ours)
    params = [x, upsample.conv.weight, upsample.conv.bias]
    ours_grads = torch.autograd.grad(ours, params, upstream)
    theirs_grads = torch.autograd.grad(theirs, params, upstream)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_posterior_clamps_logvar_and_computes_kl_per_image():
    moments = torch.cat([torch.full((1, 2, 1, 1), 0.5), torch.tensor([[[[-40.0]], [[math.log(4.0)]]]])], dim=1)
    posterior = DiagonalGaussian.from_moments(moments)
    assert posterior.logvar.flatten().tolist() == pytest.approx([-30.0, math.log(4.0)])
    # KL of N(0.5, var) to N(0, 1) is 0.5 (mu^2 + var - 1 - log var), summed over elements.
    expected = sum(0.5 * (0.25 + math.exp(lv) - 1 - lv) for lv in (-30.0, math.log(4.0)))
    assert posterior.kl().item() == pytest.approx(expected)
    assert posterior.std.flatten()[1].item() == pytest.approx(2.0)


def test_sampling_is_reproducible_with_a_generator():
    posterior = DiagonalGaussian.from_moments(torch.randn(2, 8, 4, 4))
    a = posterior.sample(torch.Generator().manual_seed(1))
    b = posterior.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, posterior.mode())


def test_config_round_trips_through_a_dict_and_rejects_bad_widths():
    for config in PRESETS.values():
        assert AutoencoderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        AutoencoderConfig(block_out_channels=(48, 64), norm_num_groups=32)
    with pytest.raises(ValueError, match="unknown preset 'sd4'"):
        preset("sd4")


def test_flux2_carries_latent_statistics_that_it_never_applies():
    vae = AutoencoderKL(preset("flux2", block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1)).train()
    assert [key for key in vae.state_dict() if key.startswith("bn.")] == [
        "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"  # diffusers' names
    ]
    assert vae.bn.running_mean.shape == (4 * 32,) and list(vae.bn.parameters()) == []
    vae.bn.running_mean.fill_(3.0)
    posterior = vae.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert posterior.mean.shape == (1, 32, 8, 8)  # raw latents: patchifying and normalising is the codec's job
    assert vae.decode(posterior.sample()).shape == (1, 3, 16, 16)
    assert vae.bn.num_batches_tracked.item() == 0 and vae.bn.running_mean.eq(3.0).all()
    assert AutoencoderKL.from_preset("mini").bn is None


def test_decoder_widths_and_latent_statistics_are_checked():
    vae = AutoencoderKL(preset("mini", decoder_block_out_channels=(16, 32, 64)))
    assert vae.decoder.conv_in.weight.shape == (64, 4, 3, 3) and vae.decoder.conv_out.weight.shape == (3, 16, 3, 3)
    with pytest.raises(ValueError, match=r"decoder_block_out_channels \(16, 40, 64\) must be multiples"):
        preset("mini", decoder_block_out_channels=(16, 40, 64))
    with pytest.raises(ValueError, match="latents_mean and latents_std go together"):
        preset("sdxl", latents_mean=(0.0,) * 4)
    with pytest.raises(ValueError, match="latents_std must be positive"):
        preset("sdxl", latents_mean=(0.0,) * 4, latents_std=(1.0, 1.0, 0.0, 1.0))
    config = preset("sdxl", latents_mean=[0, 1, 2, 3], latents_std=[1, 1, 1, 1])
    assert config.latents_mean == (0.0, 1.0, 2.0, 3.0)
    assert AutoencoderConfig.from_dict(config.to_dict()) == config
