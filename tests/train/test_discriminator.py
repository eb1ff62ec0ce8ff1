"""The PatchGAN: output shapes, batch-size-1 training, pix2pix init, spectral norm."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from vaegan.train.discriminator import PatchDiscriminator


@pytest.mark.parametrize(("size", "logits"), [(64, 6), (256, 30)])
def test_output_is_one_logit_per_patch(size, logits):
    discriminator = PatchDiscriminator()
    out = discriminator(torch.randn(1, 3, size, size))
    assert out.shape == (1, 1, logits, logits)


def test_num_layers_sets_the_depth_and_caps_the_width():
    discriminator = PatchDiscriminator(base_channels=8, num_layers=5)
    widths = [m.out_channels for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [8, 16, 32, 64, 64, 64, 1]  # multiplier 1, 2, 4, 8, then capped at 8
    assert PatchDiscriminator(num_layers=2)(torch.randn(2, 3, 64, 64)).shape == (2, 1, 14, 14)


def test_default_norm_is_group_norm():
    norms = [m for m in PatchDiscriminator().modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert len(norms) == 3 and all(isinstance(m, nn.GroupNorm) for m in norms)


@pytest.mark.parametrize("norm", ["group", "none"])
def test_trains_at_batch_size_one(norm):
    discriminator = PatchDiscriminator(base_channels=16, norm=norm).train()
    images = torch.randn(1, 3, 64, 64, requires_grad=True)
    logits = discriminator(images)
    logits.mean().backward()
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert images.grad is not None and images.grad.abs().sum() > 0
    # GroupNorm and no norm treat each image alone: the same logits in eval mode and inside a larger batch.
    with torch.no_grad():
        alone = discriminator.eval()(images)
        in_batch = discriminator(torch.cat([images, torch.randn(3, 3, 64, 64)]))[:1]
    torch.testing.assert_close(alone, in_batch, rtol=1e-4, atol=1e-5)


def test_norm_without_bias_and_plain_convs_with_bias():
    group = [m for m in PatchDiscriminator(norm="group").modules() if isinstance(m, nn.Conv2d)]
    plain = [m for m in PatchDiscriminator(norm="none").modules() if isinstance(m, nn.Conv2d)]
    assert [m.bias is not None for m in group] == [True, False, False, False, True]
    assert all(m.bias is not None for m in plain)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_pix2pix_init(norm):
    discriminator = PatchDiscriminator(norm=norm)
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    big = convs[3].weight  # 256 -> 512 channels, 2M weights: tight statistics
    assert abs(big.mean().item()) < 1e-3 and big.std().item() == pytest.approx(0.02, rel=0.01)
    assert all(m.bias is None or torch.all(m.bias == 0) for m in convs)
    norms = [m for m in discriminator.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    scales, shifts = torch.cat([m.weight for m in norms]), torch.cat([m.bias for m in norms])
    assert scales.mean().item() == pytest.approx(1.0, abs=0.005)
    assert scales.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.all(shifts == 0)


def test_spectral_norm_bounds_every_conv():
    discriminator = PatchDiscriminator(base_channels=16, norm="none", spectral_norm=True)
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert all(parametrize.is_parametrized(m, "weight") for m in convs)
    with torch.no_grad():
        for _ in range(10):  # power iterations run in training mode, one per forward
            discriminator(torch.randn(2, 3, 64, 64))
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)
    assert discriminator(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="unknown norm 'instance'"):
        PatchDiscriminator(norm="instance")
