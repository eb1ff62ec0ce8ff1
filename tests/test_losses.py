"""Loss terms against hand-computed values, the adaptive GAN weight, the schedule, and the frozen LPIPS."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from vaegan.autoencoder import DiagonalGaussian
from vaegan.losses import (
    adaptive_gan_weight,
    discriminator_loss,
    gan_weight_schedule,
    generator_adversarial_loss,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
    nll_loss,
    non_saturating_g_loss,
    reconstruction_loss,
    vanilla_d_loss,
)
from vaegan.perceptual import PerceptualLoss

LN2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


# ---------------------------------------------------------------- reconstruction, NLL, KL


def test_reconstruction_loss_is_an_unreduced_map():
    x, x_hat = t(0.0, 1.0).view(1, 1, 1, 2), t(0.5, -1.0).view(1, 1, 1, 2)
    torch.testing.assert_close(reconstruction_loss(x, x_hat), t(0.5, 2.0).view(1, 1, 1, 2))
    torch.testing.assert_close(reconstruction_loss(x, x_hat, kind="l2"), t(0.25, 4.0).view(1, 1, 1, 2))
    with pytest.raises(ValueError, match="'huber'"):
        reconstruction_loss(x, x_hat, kind="huber")


def test_nll_is_a_mean_under_the_learned_variance():
    rec_map = t(1.0, 3.0).view(1, 1, 1, 2)
    logvar = nn.Parameter(torch.tensor(LN2))
    loss = nll_loss(rec_map, logvar)
    assert loss.item() == pytest.approx((0.5 + LN2 + 1.5 + LN2) / 2)
    loss.backward()  # d/dlogvar mean(r e^-s + s) = 1 - mean(r) e^-s = 1 - 2/2
    assert logvar.grad.item() == pytest.approx(0.0, abs=1e-6)
    # A mean: the same per-pixel error gives the same loss at any resolution.
    zero = torch.tensor(0.0)
    assert nll_loss(torch.ones(2, 3, 8, 8), zero) == nll_loss(torch.ones(1, 3, 64, 64), zero)


def test_kl_is_a_mean_over_latent_elements():
    zeros, ones = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    assert kl_loss(DiagonalGaussian(zeros, zeros)).item() == 0.0
    assert kl_loss(DiagonalGaussian(ones, zeros)).item() == pytest.approx(0.5)  # 0.5 * mean^2
    posterior = DiagonalGaussian(torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), LN2))
    assert kl_loss(posterior).item() == pytest.approx(0.5 * (1 - LN2))
    # The conversion from ldm's per-image sum, as documented.
    posterior = DiagonalGaussian(torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6))
    assert (kl_loss(posterior) * 4 * 5 * 6).item() == pytest.approx(posterior.kl().mean().item(), rel=1e-5)


# ---------------------------------------------------------------- adversarial


def test_discriminator_losses():
    real, fake = t(2.0, 0.0), t(-2.0, 1.0)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 1.0))
    assert vanilla_d_loss(t(0.0), t(0.0)).item() == pytest.approx(LN2)
    expected = 0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)))
    assert vanilla_d_loss(t(2.0), t(-1.0)).item() == pytest.approx(expected)
    assert discriminator_loss("hinge", real, fake) == hinge_d_loss(real, fake)
    assert discriminator_loss("vanilla", real, fake) == vanilla_d_loss(real, fake)
    assert discriminator_loss("non_saturating", real, fake) == vanilla_d_loss(real, fake)
    with pytest.raises(ValueError, match="'wgan'"):
        discriminator_loss("wgan", real, fake)


def test_generator_losses():
    fake = t(1.0, 3.0)
    assert hinge_g_loss(fake).item() == -2.0
    assert non_saturating_g_loss(t(0.0)).item() == pytest.approx(LN2)
    assert generator_adversarial_loss("hinge", fake) == -2.0
    assert generator_adversarial_loss("vanilla", fake) == -2.0  # taming/ldm use -mean D for both
    assert generator_adversarial_loss("non_saturating", t(0.0)).item() == pytest.approx(LN2)
    with pytest.raises(ValueError, match="'wgan'"):
        generator_adversarial_loss("wgan", fake)


# ---------------------------------------------------------------- adaptive weight and schedule


def linear_last_layer(a: float, b: float):
    """nll = a * (w . v), g = b * (w . v): the gradients are a * v and b * v, with ||v|| = 5."""
    w = nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
    out = w @ t(3.0, 4.0, 0.0)
    return a * out, b * out, w


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    nll, g, w = linear_last_layer(2.0, 0.5)
    weight = adaptive_gan_weight(nll, g, w)
    assert weight.item() == pytest.approx(10.0 / (2.5 + 1e-4))
    assert weight.dtype == torch.float32 and not weight.requires_grad
    assert w.grad is None  # nothing accumulated: the caller's backward is the only one that counts
    (nll + weight * g).backward()  # the graph was retained
    assert w.grad is not None


def test_adaptive_weight_is_clamped():
    nll, g, w = linear_last_layer(2.0, 0.0)  # 10 / 1e-4 = 1e5
    assert adaptive_gan_weight(nll, g, w).item() == 1e4
    nll, g, w = linear_last_layer(2.0, 0.0)
    assert adaptive_gan_weight(nll, g, w, max_weight=50.0).item() == 50.0


@pytest.mark.parametrize(("a", "b"), [(math.nan, 1), (1, math.nan), (math.inf, 1), (math.inf, math.inf)])
def test_adaptive_weight_is_zero_when_not_finite(a, b):
    nll, g, w = linear_last_layer(a, b)
    assert adaptive_gan_weight(nll, g, w).item() == 0.0


def test_adaptive_weight_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 3, 3, padding=1)
    features = torch.randn(2, 8, 16, 16)
    target = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(features)
        assert out.dtype == torch.bfloat16
        nll = (out - target).abs().mean()
        g = -(out * 3.0).mean()
        weight = adaptive_gan_weight(nll, g, layer.weight)
    assert weight.dtype == torch.float32
    # The same computation in fp32, from the same (bf16-rounded) losses' fp32 twins.
    out = layer(features)
    reference = adaptive_gan_weight((out - target).abs().mean(), -(out * 3.0).mean(), layer.weight)
    assert weight.item() == pytest.approx(reference.item(), rel=0.05)


def test_gan_weight_schedule_counts_batches():
    assert [gan_weight_schedule(b, start=10, warmup=4) for b in (0, 9, 10, 11, 12, 13, 14, 1000)] == [
        0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0,
    ]
    assert [gan_weight_schedule(b, start=10, warmup=0) for b in (9, 10)] == [0.0, 1.0]
    assert gan_weight_schedule(0, start=0, warmup=0) == 1.0
    assert gan_weight_schedule(10, start=10, warmup=1) == 1.0


# ---------------------------------------------------------------- perceptual (LPIPS)


def read_image(path: Path) -> torch.Tensor:
    """An RGB file as a (1, 3, H, W) tensor in [-1, 1]."""
    array = np.array(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1.0


@pytest.fixture(scope="module")
def squeeze(assets) -> PerceptualLoss:
    return PerceptualLoss("squeeze", weights=assets / "lpips" / "squeezenet1_1_features.safetensors")


@pytest.fixture(scope="module")
def alex(assets) -> PerceptualLoss:
    return PerceptualLoss("alex", weights=assets / "lpips" / "alexnet_features.safetensors")


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """No weights folder entry, an empty torchvision cache, and no download possible."""
    (tmp_path / "weights").mkdir()
    monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url, *args, **kwargs):
        raise OSError(f"offline test: no download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


@pytest.fixture
def examples(assets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    folder = assets / "lpips" / "examples"
    if not folder.is_dir():
        pytest.skip(f"LPIPS example patches not found in {folder}")
    return tuple(read_image(folder / f"ex_{name}.png") for name in ("ref", "p0", "p1"))


@pytest.mark.parametrize(("net", "expected"), [("alex", (0.722, 0.138)), ("squeeze", (0.711, 0.148))])
def test_lpips_matches_the_checked_values(net, expected, examples, request):
    perceptual = request.getfixturevalue(net)
    ref, p0, p1 = examples
    distances = perceptual(torch.cat([ref, ref]), torch.cat([p0, p1]))
    assert distances.shape == (2,)
    assert distances.tolist() == pytest.approx(expected, abs=1e-3)


def test_backbone_comes_from_the_weights_folder(assets):
    perceptual = PerceptualLoss("squeeze")  # conftest points VAEGAN_WEIGHTS_DIR at the shared folder
    assert perceptual.backbone_source.endswith("squeezenet1_1_features.safetensors")


def test_vgg_backbone_file_maps_onto_every_lpips_slice(tmp_path):
    # VGG16 weights are not available offline, so a random `features` file checks the key mapping.
    features = torchvision.models.vgg16().features.state_dict()
    save_file(features, tmp_path / "vgg16_features.safetensors")
    perceptual = PerceptualLoss("vgg", weights=tmp_path / "vgg16_features.safetensors")
    torch.testing.assert_close(perceptual.model.net.slice5.get_parameter("28.weight"), features["28.weight"])
    assert perceptual(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)).item() == 0.0


def test_incomplete_backbone_file_is_rejected(assets, tmp_path):
    features = load_file(assets / "lpips" / "squeezenet1_1_features.safetensors")
    del features["12.expand3x3.weight"]
    save_file(features, tmp_path / "broken.safetensors")
    with pytest.raises(RuntimeError, match=r"broken.safetensors.*missing \['12.expand3x3.weight'\]"):
        PerceptualLoss("squeeze", weights=tmp_path / "broken.safetensors")


def test_lpips_is_frozen_and_stays_in_eval_mode(squeeze):
    parent = nn.ModuleDict({"perceptual": squeeze}).train()
    assert not any(module.training for module in squeeze.modules())
    assert not any(module.training for module in parent["perceptual"].modules())
    assert all(not p.requires_grad for p in squeeze.parameters())
    # Dropout stays off: the same inputs give the same distance every time.
    x, y = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    assert torch.equal(squeeze(x, y), squeeze(x, y))


def test_gradient_reaches_the_input_but_not_the_weights(squeeze):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
    squeeze(x, y).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in squeeze.parameters())


def test_missing_weights_raise_and_name_the_file(no_weights_anywhere):
    with pytest.raises(RuntimeError, match="alexnet_features.safetensors") as error:
        PerceptualLoss("alex")
    assert "VAEGAN_WEIGHTS_DIR" in str(error.value)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        PerceptualLoss("alex", weights="/nonexistent/nothing.safetensors")


def test_offline_mode_never_downloads(no_weights_anywhere):
    with pytest.raises(RuntimeError, match=r"alexnet-owt.*\.pth is not cached and \$VAEGAN_OFFLINE forbids"):
        PerceptualLoss("alex")


def test_random_backbone_only_on_request(no_weights_anywhere, alex, examples):
    with pytest.warns(UserWarning, match="RANDOM backbone"):
        random_alex = PerceptualLoss("alex", allow_random_backbone=True)
    assert random_alex.backbone_source == "random"
    ref, p0, p1 = examples
    real = alex(torch.cat([ref, ref]), torch.cat([p0, p1]))
    random = random_alex(torch.cat([ref, ref]), torch.cat([p0, p1]))
    assert (real - random).abs().max() > 0.1


def test_lpips_grows_with_noise_and_blur_on_kodak(assets, squeeze, alex):
    image = read_image(assets / "kodak" / "kodim23.png")[..., 192:320, 320:448]  # (1, 3, 128, 128)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(image.shape, generator=generator)
    noisy = torch.cat([image + sigma * noise for sigma in (0.05, 0.1, 0.2, 0.4)])
    blurred = torch.cat([TF.gaussian_blur(image, 2 * math.ceil(3 * s) + 1, s) for s in (0.5, 1.0, 2.0, 4.0)])
    references = image.expand(4, -1, -1, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fallback would show up here
        for perceptual in (squeeze, alex):
            for distorted in (noisy, blurred):
                distances = perceptual(references, distorted)
                assert torch.all(distances.diff() > 0), distances
                assert distances[0] > 0.0
