"""Loss terms against hand-computed values, the adaptive weights, the schedules, the diffusability regularisers
(known values and gradients) and the frozen LPIPS."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from vaegan.autoencoder.network import DiagonalGaussian
from vaegan.images.transforms import LatentTransform, resize
from vaegan.pretrained.lpips import PerceptualLoss
from vaegan.train.losses import (
    adaptive_gan_weight,
    adaptive_weight,
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
from vaegan.train.regularizers import (
    eq_vae_transform,
    equivariance_loss,
    latent_noise_loss,
    noisy_latents,
    scale_equivariance_transform,
    term_schedule,
    vf_loss,
)

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


def test_term_schedule_rises_holds_and_falls():
    assert [term_schedule(b, start=10, ramp=4, end=20) for b in (9, 10, 13, 19, 20, 21, 22, 23, 100)] == [
        0.0, 0.25, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0,
    ]
    assert [term_schedule(b, start=5, ramp=0, end=7) for b in (4, 5, 6, 7)] == [0.0, 1.0, 1.0, 0.0]
    assert term_schedule(10**9, start=0, ramp=0) == 1.0
    # A ramp longer than the stage: the fall starts from where the rise got to.
    assert term_schedule(11, start=10, ramp=10, end=11) == pytest.approx(min(0.2, 0.9))


def test_adaptive_weight_is_the_gan_weights_formula():
    nll, g, w = linear_last_layer(2.0, 0.5)
    assert adaptive_weight(nll, g, w).item() == adaptive_gan_weight(nll, g, w).item() == pytest.approx(4.0, rel=1e-4)


# ---------------------------------------------------------------- diffusability regularisers


def nearest_up(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """An identity-like decoder of `F.avg_pool2d` latents: each latent pixel becomes factor x factor pixels."""
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def l1(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).abs().mean(dim=(1, 2, 3))


def test_latent_transform_resizes_latent_and_image_alike_and_rotates():
    x = torch.arange(2 * 3 * 8 * 6, dtype=torch.float32).view(2, 3, 8, 6)
    turn = LatentTransform(quarter_turns=1)
    torch.testing.assert_close(turn(x), torch.rot90(x, 1, dims=(-2, -1)))
    assert LatentTransform()(x) is x
    both = LatentTransform(size=(2, 3), quarter_turns=3)
    assert both(x).shape == (2, 3, 3, 2) and both(x, factor=4).shape == (2, 3, 12, 8)
    # Shrinking is antialiased: a 2x bilinear downscale of a constant stays that constant; a checkerboard greys.
    assert torch.allclose(resize(torch.full((1, 1, 8, 8), 0.7), (4, 4)), torch.full((1, 1, 4, 4), 0.7))
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2.0 - 1  # +-1
    assert resize(checkerboard[None, None], (4, 4)).abs().max() < 0.3
    assert resize(x.bfloat16(), (4, 3)).dtype == torch.bfloat16


def test_eq_vae_transform_draws_from_its_generator_only():
    draws = [eq_vae_transform((32, 32), torch.Generator().manual_seed(seed)) for seed in range(300)]
    torch.manual_seed(123)  # the global state plays no part
    assert eq_vae_transform((32, 32), torch.Generator().manual_seed(7)) == draws[7]
    assert all(8 <= d.size[0] <= 32 and d.size[0] == d.size[1] for d in draws)  # s in [0.25, 1), both kinds
    assert {d.quarter_turns for d in draws} == {1, 2, 3}
    sizes = [d.size[0] for d in draws]
    assert min(sizes) == 8 and max(sizes) >= 31 and 18 < np.mean(sizes) < 22  # uniform: mean 0.625 * 32 = 20
    assert all(d.size is None for d in (eq_vae_transform((8, 8), torch.Generator(), rotate=True, scale=False)
                                        for _ in range(5)))
    with pytest.raises(ValueError, match="at least one kind"):
        eq_vae_transform((8, 8), torch.Generator(), scale=False, rotate=False)


def test_scale_equivariance_transform_halves_or_quarters():
    sizes = {scale_equivariance_transform((32, 16), torch.Generator().manual_seed(s)).size for s in range(40)}
    assert sizes == {(16, 8), (8, 4)}


def test_equivariance_loss_of_identity_like_decoders():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    # f = 1 and the identity: D(τ·z) = τ·x exactly, for every τ.
    for transform in (LatentTransform((5, 5)), LatentTransform(quarter_turns=1), LatentTransform((4, 4), 2)):
        assert equivariance_loss(lambda z: z, images, images, transform, l1).item() == 0.0
    # f = 2, z = 2x2 average, D = nearest upsampling: both commute with a quarter turn, so the equivariance error
    # of a rotation is the plain reconstruction error.
    latents = F.avg_pool2d(images, 2)
    expected = l1(nearest_up(latents), images).mean()
    rotated = equivariance_loss(nearest_up, latents, images, LatentTransform(quarter_turns=1), l1)
    assert rotated.item() == pytest.approx(expected.item(), rel=1e-6)


def test_equivariance_loss_trains_encoder_and_decoder():
    decoder = nn.Conv2d(4, 3, 1)
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    images = torch.rand(2, 3, 8, 8)
    equivariance_loss(decoder, latents, images, LatentTransform((4, 4), 1), l1).backward()
    assert latents.grad.abs().sum() > 0 and decoder.weight.grad.abs().sum() > 0


def test_noisy_latents_scale_with_each_images_std():
    z = torch.randn(4000, 1, 4, 4) * torch.tensor([0.5, 2.0]).repeat(2000).view(-1, 1, 1, 1)
    noisy = noisy_latents(z, torch.Generator().manual_seed(0), sigma_scale=0.3)
    relative = (noisy - z).flatten(1).pow(2).mean(dim=1).sqrt() / z.flatten(1).std(dim=1)  # ~ |n| per image
    # |N(0, 0.3^2)| has mean 0.3 * sqrt(2 / pi) = 0.239, for small and large latents alike.
    for part in (relative[0::2], relative[1::2]):
        assert part.mean().item() == pytest.approx(0.3 * math.sqrt(2 / math.pi), rel=0.08)
    torch.manual_seed(5)
    again = noisy_latents(z, torch.Generator().manual_seed(0), sigma_scale=0.3)
    assert torch.equal(noisy, again)


def test_latent_noise_loss_of_an_identity_decoder():
    z = torch.full((3, 2, 8, 8), 0.25) + torch.linspace(-0.1, 0.1, 8)  # std 0.06 per image
    assert latent_noise_loss(lambda v: v, z, z, torch.Generator(), 1e-12, l1).item() < 1e-9
    mse = latent_noise_loss(lambda v: v, z, z, torch.Generator().manual_seed(1), 0.5,
                            lambda a, b: (a - b).pow(2).mean(dim=(1, 2, 3)))
    n = torch.randn(3, generator=torch.Generator().manual_seed(1)).abs()  # the generator's first draws: |n|
    expected = (n * 0.5 * z.flatten(1).std(dim=1)).pow(2).mean()  # E[eps^2] = 1
    assert mse.item() == pytest.approx(expected.item(), rel=0.15)


def unit_grid(*vectors: tuple[float, ...]) -> torch.Tensor:
    """Vectors at positions 0..N-1 of a 1 x N grid: (1, D, 1, N)."""
    return torch.tensor(vectors, dtype=torch.float64).T[None, :, None, :]


def test_vf_loss_known_values():
    f = unit_grid((1.0, 0.0), (0.0, 1.0))
    aligned = vf_loss(2 * f, f)
    assert aligned.margin_cosine.item() == 0.0 and aligned.margin_distance.item() == 0.0
    assert aligned.mean_cosine.item() == pytest.approx(1.0)
    # Opposite vectors: cos -1 everywhere, relu(1 - 0.5 + 1) = 1.5; the self-similarities still agree.
    opposite = vf_loss(-f, f)
    assert opposite.margin_cosine.item() == pytest.approx(1.5) and opposite.margin_distance.item() == 0.0
    # Both latent positions point along f_0: cosines (1, 0) -> mean relu(0.5 - cos) = 0.25; the latent
    # self-similarity is all ones against the identity: |1 - 0| - 0.25 off the diagonal -> mean 0.375.
    collapsed = vf_loss(unit_grid((1.0, 0.0), (1.0, 0.0)), f)
    assert collapsed.margin_cosine.item() == pytest.approx(0.25)
    assert collapsed.margin_distance.item() == pytest.approx(0.375)


def test_vf_loss_centred_features_leave_nothing_for_a_constant_projection():
    # Features sharing a large common part, (10, ±1): a projection that ignores the latents (the bias alone,
    # (1, 0) everywhere) has cosine 10/sqrt(101) with both and meets the margin; centred they are (0, ±1),
    # the constant is orthogonal to both (cos 0, relu(0.5 - 0) = 0.5), and the latents (0, ±3) align exactly.
    features = unit_grid((10.0, 1.0), (10.0, -1.0))
    constant = unit_grid((1.0, 0.0), (1.0, 0.0))
    assert vf_loss(constant, features).mean_cosine.item() == pytest.approx(10 / 101 ** 0.5)
    assert vf_loss(constant, features).margin_cosine.item() == 0.0
    centred = vf_loss(constant, features, center_features=True)
    assert centred.mean_cosine.item() == pytest.approx(0.0) and centred.margin_cosine.item() == pytest.approx(0.5)
    following = vf_loss(unit_grid((0.0, 3.0), (0.0, -3.0)), features, center_features=True)
    assert following.mean_cosine.item() == pytest.approx(1.0)
    assert following.margin_cosine.item() == 0.0 and following.margin_distance.item() == 0.0


def test_vf_loss_gradients():
    # d/dz relu(0.5 - cos(z, f)) at z = (0, 1), f = (1, 0): cos = 0, gradient -(f/|f||z| - cos z/|z|^2) = (-1, 0).
    z = unit_grid((0.0, 1.0)).requires_grad_(True)
    vf_loss(z, unit_grid((1.0, 0.0))).margin_cosine.backward()
    torch.testing.assert_close(z.grad.flatten(), torch.tensor([-1.0, 0.0], dtype=torch.float64))
    # Both terms against finite differences (away from the hinges), through the resize to the feature grid.
    generator = torch.Generator().manual_seed(0)
    projected = torch.randn(2, 6, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2, 6, 3, 3, generator=generator, dtype=torch.float64)
    for term in ("margin_cosine", "margin_distance"):
        assert torch.autograd.gradcheck(lambda p, term=term: getattr(vf_loss(p, features, 0.0, 0.0), term),
                                        (projected,))


def test_vf_loss_is_fp32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    projected, features = torch.randn(2, 2, 8, 16, 16, generator=generator)
    reference = vf_loss(projected, features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = vf_loss(projected.bfloat16(), features.bfloat16())
    assert mixed.margin_cosine.dtype == torch.float32 and torch.isfinite(mixed.margin_distance)
    assert mixed.margin_cosine.item() == pytest.approx(reference.margin_cosine.item(), rel=0.02)


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
