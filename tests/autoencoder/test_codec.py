"""The frozen codec: normalisation, input kinds, batching, tiling, precision and its error messages."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut
from skimage.transform import resize

from vaegan import AutoencoderKL, Codec, preset
from vaegan.autoencoder.blend_tiling import TileGrid, tile_weight_map

# SD-shaped (quant convs, mid attention, 2 resnets per decoder level) but small: f4, widths 32-64-64.
SMALL = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, layers_per_block=1)


def small_vae(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(preset("sd", **SMALL, **overrides))


def photo(size: int) -> torch.Tensor:
    """skimage's astronaut, downscaled: (1, 3, size, size) in [-1, 1]."""
    image = resize(astronaut(), (size, size), anti_aliasing=True)  # float64 in [0, 1]
    return torch.from_numpy(image).float().permute(2, 0, 1)[None] * 2 - 1


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return small_vae(scaling_factor=0.5, shift_factor=0.25)


def test_encode_normalises_the_posterior_mean_and_decode_inverts_it(vae):
    codec = Codec(vae)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x)
        latents = codec.encode(x)
        torch.testing.assert_close(latents, (posterior.mean - 0.25) * 0.5, rtol=1e-5, atol=1e-5)
        expected = vae.decode(latents / 0.5 + 0.25).clamp(-1, 1)
    torch.testing.assert_close(codec.decode(latents), expected, rtol=1e-5, atol=1e-5)
    assert not latents.is_inference()  # safe to modify in place outside inference mode


def test_sample_draws_from_the_posterior_with_the_given_generator(vae):
    codec = Codec(vae)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    first = codec.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    again = codec.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, again)
    with torch.no_grad():
        posterior = vae.encode(x)
        expected = (posterior.sample(torch.Generator().manual_seed(1)) - 0.25) * 0.5
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)


def test_codec_freezes_the_model(vae):
    Codec(vae)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_convolutions_run_channels_last_by_default_on_a_cpu_only():
    # NHWC is faster with oneDNN and was slower with cuDNN on the one GPU measured (docs/gpu/2026-11-29-h200).
    weight = Codec(small_vae()).vae.decoder.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    elsewhere = Codec(small_vae(), device="meta")
    assert not elsewhere.channels_last and elsewhere.vae.decoder.conv_in.weight.is_contiguous()
    assert Codec(small_vae(), channels_last=False).vae.decoder.conv_in.weight.is_contiguous()


def test_every_input_kind_encodes_alike_and_decode_returns_the_kind_asked_for(vae):
    codec = Codec(vae)
    array = np.random.default_rng(0).integers(0, 256, (2, 32, 40, 3), dtype=np.uint8)  # (B, H, W, 3)
    as_uint8 = torch.from_numpy(array).permute(0, 3, 1, 2)                               # (B, 3, H, W)
    reference = codec.encode(as_uint8.float() / 127.5 - 1)
    kinds = [as_uint8, array, [Image.fromarray(a) for a in array]]
    for images in kinds:
        torch.testing.assert_close(codec.encode(images), reference)
    torch.testing.assert_close(codec.encode(array[0]), reference[:1])           # unbatched HWC
    torch.testing.assert_close(codec.encode(Image.fromarray(array[1])), reference[1:])

    images = codec.decode(reference)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 40) and images.abs().max() <= 1
    uint8 = codec.decode(reference, output="uint8")
    assert uint8.dtype == torch.uint8 and uint8.shape == (2, 3, 32, 40)
    numpy = codec.decode(reference, output="numpy")
    assert numpy.dtype == np.uint8 and numpy.shape == (2, 32, 40, 3)
    np.testing.assert_array_equal(numpy, uint8.permute(0, 2, 3, 1).numpy())
    pil = codec.decode(reference, output="pil")
    assert len(pil) == 2 and pil[0].size == (40, 32) and pil[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[1]), numpy[1])
    torch.testing.assert_close(codec.decode(reference[0]), images[:1])          # unbatched latent


def test_chunked_batches_equal_one_big_batch(vae):
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    big, chunked = Codec(vae, batch_size=8), Codec(vae, batch_size=2)
    latents = big.encode(x)
    torch.testing.assert_close(chunked.encode(x), latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.decode(latents), big.decode(latents), rtol=1e-5, atol=1e-5)


def test_tile_weights_sum_to_one_and_tiles_cover_the_axis():
    for length, tile, overlap in [(25, 8, 2), (41, 16, 4), (82, 16, 4), (16, 16, 4)]:
        grid = TileGrid.cover(length, tile, overlap)
        assert grid.starts[0] == 0 and grid.starts[-1] + grid.tile == length
        assert all(b - a <= tile - overlap for a, b in zip(grid.starts[:-1], grid.starts[1:], strict=True))
    rows, cols = TileGrid.cover(25, 8, 2), TileGrid.cover(41, 16, 4)
    total = tile_weight_map(rows, cols, scale=4)
    assert total.shape == (100, 164) and total.min() > 0


def test_tiled_shapes_are_exact_for_odd_sizes(vae):
    codec = Codec(vae, tile_size=64, tile_overlap=16)
    x = torch.rand(1, 3, 200, 328) * 2 - 1
    latents = codec.encode(x)
    assert latents.shape == (1, 4, 50, 82)
    assert codec.decode(latents).shape == (1, 3, 200, 328)
    assert codec.decode(latents[..., :49, :81]).shape == (1, 3, 196, 324)


def test_tiling_starts_automatically_above_the_pixel_threshold(vae):
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    auto = Codec(vae, auto_tile_pixels=48 * 48)
    untiled = Codec(vae, auto_tile_pixels=None)
    # 64^2 images fit one default 512-px tile, so auto-tiling must reproduce the untiled result exactly...
    torch.testing.assert_close(auto.encode(x), untiled.encode(x))
    # ... and a smaller forced tile of independent tiles differs, proving the tiled path actually ran.
    assert not torch.allclose(Codec(vae, tile_size=32, tile_overlap=16, tiling="blend").encode(x), untiled.encode(x))


def test_tile_blending_is_exact_for_a_local_network(vae):
    # With a network that only looks at each pixel, any tiling must reproduce the untiled output: this checks
    # the placement of tiles and that the blending weights sum to one everywhere.
    codec = Codec(vae, tile_size=32, tile_overlap=8, tiling="blend")
    codec._encoder = lambda x: torch.nn.functional.avg_pool2d(x, 4).repeat(1, 3, 1, 1)[:, :8] * 3
    codec._decoder = lambda z: torch.nn.functional.interpolate(z[:, :3].tanh(), scale_factor=4.0)
    untiled = copy.copy(codec)
    untiled.tile_size = None
    x = torch.rand(2, 3, 72, 104) * 2 - 1
    latents = untiled.encode(x)
    torch.testing.assert_close(codec.encode(x), latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(codec.decode(latents), untiled.decode(latents), rtol=1e-5, atol=1e-6)


def test_tiled_is_close_to_untiled_on_a_real_photo():
    # Random weights, 96-px tiles (32-px overlap) on a 128-px photo: GroupNorm and mid-block attention
    # statistics differ per tile, which blending can fade but not remove. Measured: latents max 0.079 /
    # mean 0.0066 (their std is 0.065); decoded images max 0.56 / mean 0.046 (std 0.29). Tolerances ~1.5x.
    vae = small_vae()
    x = photo(128)
    untiled = Codec(vae)
    tiled = Codec(vae, tile_size=96, tile_overlap=32, tiling="blend")
    latents = untiled.encode(x)
    latent_error = (tiled.encode(x) - latents).abs()
    assert latent_error.max() < 0.12 and latent_error.mean() < 0.01
    image_error = (tiled.decode(latents) - untiled.decode(latents)).abs()
    assert image_error.max() < 0.85 and image_error.mean() < 0.07


def test_exact_tiling_is_the_untiled_codec_on_a_real_photo():
    # The same photo and tiles as above, through the codec's default tiling: equal up to float32 rounding.
    vae = small_vae()
    x = photo(128)
    untiled, tiled = Codec(vae), Codec(vae, tile_size=32)
    latents = untiled.encode(x)
    torch.testing.assert_close(tiled.encode(x), latents, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(tiled.decode(latents), untiled.decode(latents), rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(tiled.posterior(x).logvar, untiled.posterior(x).logvar, rtol=1e-5, atol=3e-5)


@pytest.mark.slow
def test_compiled_codec_matches_eager(vae):
    # torch.compile (inductor, CPU here) of the encoder and decoder calls, including the upsampling's transposed conv.
    x = photo(64)
    eager, compiled = Codec(copy.deepcopy(vae)), Codec(copy.deepcopy(vae), compile=True)
    latents = eager.encode(x)
    torch.testing.assert_close(compiled.encode(x), latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.decode(latents), eager.decode(latents), rtol=1e-4, atol=1e-4)


def test_bf16_is_close_to_fp32(vae):
    x = photo(64)
    reference = Codec(copy.deepcopy(vae))
    bf16 = Codec(copy.deepcopy(vae), dtype=torch.bfloat16)
    latents = reference.encode(x)
    torch.testing.assert_close(bf16.encode(x), latents, rtol=0, atol=0.05)
    error = (bf16.decode(latents) - reference.decode(latents)).abs()
    assert error.mean() < 0.01 and error.max() < 0.1


def test_fp16_decode_that_overflows_is_redone_in_fp32():
    vae = small_vae()
    # Scale the decoder's input conv so the residual stream peaks near 8e4, as in the SD/SDXL decoders on some
    # images: every later GroupNorm rescales it in fp32, but fp16 cannot hold values above 65504.
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e4)
    latents = torch.randn(2, 4, 8, 8)
    reference = Codec(copy.deepcopy(vae)).decode(latents)
    with torch.no_grad():
        raw_fp16 = copy.deepcopy(vae).half().decode(latents.half() / 0.18215)
    assert not torch.isfinite(raw_fp16).all(), "the test model no longer overflows in fp16"

    codec = Codec(vae, dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="fp16 overflowed"):
        images = codec.decode(latents)
    assert torch.isfinite(images).all()
    torch.testing.assert_close(images, reference, rtol=0, atol=0.02)

    # Exact tiles redo the overflowing chunk in fp32 with fp32 stashes, even where fp16 stashes were asked for.
    tiled = Codec(vae, dtype=torch.float16, tile_size=32, stash_dtype="fp16")
    with pytest.warns(RuntimeWarning, match="fp16 overflowed"):
        images = tiled.decode(latents)
    torch.testing.assert_close(images, reference, rtol=0, atol=0.02)


def test_wrong_latent_channels_name_expected_and_actual_shapes(vae):
    with pytest.raises(ValueError, match=r"\(1, 16, 8, 8\).*\(B, 4, h, w\)"):
        Codec(vae).decode(torch.zeros(1, 16, 8, 8))


def test_bad_image_inputs_raise_clear_errors(vae):
    codec = Codec(vae)
    with pytest.raises(ValueError, match=r"\(1, 3, 30, 32\).*multiples of the downsampling factor 4"):
        codec.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="must be in \\[-1, 1\\]"):
        codec.encode(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        codec.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(TypeError, match="uint8"):
        codec.encode(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of the downsampling factor"):
        Codec(vae, tile_size=66)
