"""Tiny autoencoders: the published TAEF2 against an independent forward pass, the codec in a teacher's space,
and exact tiling with halos."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vaegan
from vaegan.autoencoder.halo_tiling import receptive_radius
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.autoencoder.tiny import TINY_PRESETS, TinyAutoencoder, multiply_adds_per_pixel


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, decoder: bool) -> torch.Tensor:
    """TAESD's published network run straight from its numbered state dict, written from the description in its
    README and weights (not from our modules): layer i is a block when it has `i.conv.0.weight`, else a 3x3
    conv; a stride-2 conv has no bias in the encoder after the first level; in the decoder, a bias-free conv
    after the first follows a 2x nearest upsampling; ReLUs follow the first conv (decoder) and every block."""
    indices = sorted({int(key.split(".")[0]) for key in state})

    def conv(x, weight, bias=None, stride=1):
        return F.conv2d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2)

    def block(x, i):
        if f"{i}.pool.0.weight" in state:
            h = F.conv2d(x, state[f"{i}.pool.0.weight"])
            h = F.relu(F.group_norm(h, 4, state[f"{i}.pool.1.weight"], state[f"{i}.pool.1.bias"]))
            x = x + F.conv2d(h, state[f"{i}.pool.3.weight"])
        h = F.relu(conv(x, state[f"{i}.conv.0.weight"], state[f"{i}.conv.0.bias"]))
        h = F.relu(conv(h, state[f"{i}.conv.2.weight"], state[f"{i}.conv.2.bias"]))
        return F.relu(conv(h, state[f"{i}.conv.4.weight"], state[f"{i}.conv.4.bias"]) + x)

    if decoder:
        x = torch.tanh(x / 3) * 3
    for position, i in enumerate(indices):
        if f"{i}.conv.0.weight" in state:
            x = block(x, i)
        elif decoder:
            if position > 0 and i != indices[-1]:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = conv(x, state[f"{i}.weight"], state.get(f"{i}.bias"))
            if position == 0:
                x = F.relu(x)
        else:
            stride = 2 if f"{i}.bias" not in state else 1
            x = conv(x, state[f"{i}.weight"], state.get(f"{i}.bias"), stride)
    return x


def kodak(assets: Path, names=("kodim05.png", "kodim23.png")) -> torch.Tensor:
    arrays = [np.asarray(Image.open(assets / "kodak" / name).convert("RGB").crop((0, 0, 512, 384))) for name in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (2, 3, 384, 512)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / (a - b).pow(2).mean()))


def test_published_taef2_equals_the_reference_forward_on_real_photos(assets):
    taef2 = vaegan.load(assets / "taesd")
    images = kodak(assets)
    # The published weights are fp16; vaegan loads them in fp32 (highest precision by default), and so does this.
    encoder = {k: v.float() for k, v in torch.load(assets / "taesd" / "taef2_encoder.pth", weights_only=True).items()}
    decoder = {k: v.float() for k, v in torch.load(assets / "taesd" / "taef2_decoder.pth", weights_only=True).items()}
    with torch.no_grad():
        latents = taef2.encode(images)
        expected = reference_forward(encoder, images * 0.5 + 0.5, decoder=False)
        assert latents.shape == (2, 32, 48, 64)
        assert (latents - expected).abs().max() < 1e-5
        decoded = taef2.decode(latents)
        expected = reference_forward(decoder, latents, decoder=True) * 2 - 1
        assert (decoded - expected).abs().max() < 1e-5
    # Wired right, it reconstructs Kodak; a shifted layer index or a missing pool branch gives noise (< 12 dB).
    assert psnr(decoded.clamp(-1, 1), images) > 24
    # Its latents are FLUX.2's normalised ones folded back to 32 channels: near zero mean, unit variance.
    assert abs(float(latents.mean())) < 0.2 and 0.7 < float(latents.std()) < 1.3


def test_codec_of_taef2_speaks_flux2_patches_and_any_input_kind(assets):
    codec = vaegan.Codec(vaegan.load(assets / "taesd"))
    assert codec.normalization.kind == "patch" and codec.latent_channels == 128
    photo = Image.open(assets / "kodak" / "kodim05.png").convert("RGB").crop((0, 0, 256, 192))
    from_pil = codec.encode(photo)
    from_numpy = codec.encode(np.asarray(photo))
    assert from_pil.shape == (1, 128, 12, 16) and torch.equal(from_pil, from_numpy)
    images = codec.decode(from_pil, output="pil")
    assert images[0].size == (256, 192)
    with pytest.raises(ValueError, match=r"expected \(B, 128, h, w\)"):
        codec.decode(torch.zeros(1, 32, 12, 16))


def test_published_variants_have_their_shapes_and_costs():
    taesd = TinyAutoencoder.from_preset("taesd")
    # TAESD's README: 1,222,532 encoder and 1,222,531 decoder parameters.
    assert sum(p.numel() for p in taesd.encoder.parameters()) == 1_222_532
    assert sum(p.numel() for p in taesd.decoder.parameters()) == 1_222_531
    sana = TinyAutoencoder.from_preset("taesana")
    assert sana.config.downsampling_factor == 32
    with torch.no_grad():
        assert sana.encode(torch.zeros(1, 3, 64, 96)).shape == (1, 32, 2, 3)
        assert sana.decode(torch.zeros(1, 32, 2, 3)).shape == (1, 3, 64, 96)
    # The SD VAE's decoder convolutions cost about 12.6x TAESD's per pixel (3.4 M against 0.27 M multiply-adds).
    sd = vaegan.AutoencoderKL.from_preset("sd")
    assert 2.5e5 < multiply_adds_per_pixel(taesd.decoder, 128) < 3e5
    ratio = multiply_adds_per_pixel(sd.decoder, 128) / multiply_adds_per_pixel(taesd.decoder, 128)
    assert 10 < ratio < 15


def test_exact_tiling_with_halos_equals_the_untiled_pass():
    torch.manual_seed(0)
    model = TinyAutoencoder.from_preset("taesd")
    # 44 x 40 latent pixels in tiles of 16: wider than tile + 2 halos (the receptive radius is 19 latent pixels),
    # so interior tiles really read only part of the image.
    images = torch.rand(1, 3, 352, 320) * 2 - 1
    whole = vaegan.Codec(model, auto_tile_pixels=None)
    tiled = vaegan.Codec(model, tile_size=128)
    assert tiled._halo == {True: 19, False: 19}
    latents = whole.encode(images)
    torch.testing.assert_close(tiled.encode(images), latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(tiled.decode(latents), whole.decode(latents), rtol=0, atol=1e-5)
    # The halo is what makes it exact: with 2 latent pixels of context the tiles' seams show.
    assert receptive_radius(model.decoder, False, 8) == 19
    tiled._halo[False] = 2
    assert (tiled.decode(latents) - whole.decode(latents)).abs().max() > 1e-4


def test_taef2_is_not_tiled_exactly(assets):
    taef2 = vaegan.load(assets / "taesd")
    with pytest.raises(ValueError, match="pool branch"):
        vaegan.Codec(taef2, tile_size=256)
    assert vaegan.Codec(taef2, tile_size=256, tiling="blend").tiling == "blend"


@pytest.mark.parametrize("kind", ["scalar", "channel"])
def test_big_encoder_then_tiny_decoder_in_a_shared_space(kind):
    torch.manual_seed(0)
    teacher = vaegan.AutoencoderKL.from_preset("mini", block_out_channels=(32, 64, 128, 128))  # f8, as TAESD
    normalization = (LatentNormalization("scalar", 0.7, 0.1) if kind == "scalar"
                     else LatentNormalization("channel", 1.0, mean=(0.1, -0.2, 0.0, 0.3), std=(1.0, 2.0, 0.5, 1.5)))
    normalization.apply_to(teacher)
    student = TinyAutoencoder.from_preset("taesd")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = vaegan.Codec(teacher).encode(images)
    assert vaegan.Codec(student).decode(latents).shape == images.shape
    # ... and the reverse: the student's latents decode through the teacher.
    assert vaegan.Codec(teacher).decode(vaegan.Codec(student).encode(images)).shape == images.shape


def test_presets_are_the_published_shapes():
    assert set(TINY_PRESETS) == {"taesd", "taef2", "taesana"}
    assert TINY_PRESETS["taef2"].midblock_pool and TINY_PRESETS["taef2"].patch_size == (2, 2)


def test_flux2_shaped_teacher_and_the_real_taef2_share_patch_latents(assets):
    torch.manual_seed(0)
    teacher = vaegan.AutoencoderKL.from_preset("mini", block_out_channels=(32, 64, 128, 128), latent_channels=32,
                                               patch_size=(2, 2))
    taef2 = vaegan.Codec(vaegan.load(assets / "taesd"))
    images = torch.rand(1, 3, 64, 96) * 2 - 1
    latents = vaegan.Codec(teacher).encode(images)  # (1, 128, 4, 6): FLUX.2's patches
    assert latents.shape == (1, 128, 4, 6)
    assert taef2.decode(latents).shape == images.shape
    assert vaegan.Codec(teacher).decode(taef2.encode(images)).shape == images.shape
