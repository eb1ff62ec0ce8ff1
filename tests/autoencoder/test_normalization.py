"""The latent normalisation: the three kinds, their inverses, their log-variance rule, what they measure and
where a VAE declares them, checked against the formulas diffusers' pipelines apply."""

import pytest
import torch

import vaegan
from vaegan.autoencoder.normalization import (
    LatentNormalization,
    LatentStatistics,
    measured_layout,
    patchify,
    unpatchify,
)

diffusers = pytest.importorskip("diffusers")

TINY_F8 = {"block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8, "layers_per_block": 1}


def kinds() -> dict[str, LatentNormalization]:
    generator = torch.Generator().manual_seed(0)
    return {
        "scalar": LatentNormalization("scalar", 0.5, 0.25),
        "channel": LatentNormalization("channel", 0.8, mean=tuple(torch.randn(4, generator=generator).tolist()),
                                       std=tuple((torch.rand(4, generator=generator) + 0.5).tolist())),
        "patch": LatentNormalization("patch", mean=tuple(torch.randn(16, generator=generator).tolist()),
                                     std=tuple((torch.rand(16, generator=generator) + 0.5).tolist()),
                                     patch_size=(2, 2)),
    }


@pytest.mark.parametrize("kind", ["scalar", "channel", "patch"])
def test_every_kind_inverts_and_round_trips_through_json(kind):
    normalization = kinds()[kind]
    z = torch.randn(2, 4, 6, 8)
    latents = normalization.normalize(z)
    assert latents.shape == ((2, 16, 3, 4) if kind == "patch" else (2, 4, 6, 8))
    assert latents.shape[1] == normalization.channels(4)
    torch.testing.assert_close(normalization.denormalize(latents), z)
    assert LatentNormalization.from_json(normalization.to_json()) == normalization


def test_the_formulas_are_the_pipelines():
    normalization = kinds()
    z = torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(normalization["scalar"].normalize(z), (z - 0.25) * 0.5)
    channel = normalization["channel"]
    mean, std = torch.tensor(channel.mean).view(1, 4, 1, 1), torch.tensor(channel.std).view(1, 4, 1, 1)
    torch.testing.assert_close(channel.normalize(z), (z - mean) * 0.8 / std)  # diffusers' SDXL img2img
    # FLUX.2's pipeline: its own 2x2 patchify, then (x - running_mean) / sqrt(running_var + eps).
    patch = normalization["patch"]
    patches = diffusers.Flux2Pipeline._patchify_latents(z)
    expected = (patches - torch.tensor(patch.mean).view(1, 16, 1, 1)) / torch.tensor(patch.std).view(1, 16, 1, 1)
    torch.testing.assert_close(patch.normalize(z), expected)
    torch.testing.assert_close(patchify(z, (2, 2)), patches)
    torch.testing.assert_close(unpatchify(patches, (2, 2)), diffusers.Flux2Pipeline._unpatchify_latents(patches))
    # Legacy manifests and shards name the scalar factors only.
    assert LatentNormalization.from_json({"scaling_factor": 0.5, "shift_factor": 0.25}) == normalization["scalar"]


@pytest.mark.parametrize("kind", ["scalar", "channel", "patch"])
def test_log_variance_moves_with_the_latents(kind):
    # A sample drawn in the normalised space is the normalised sample of the raw posterior, noise for noise.
    normalization = kinds()[kind]
    mean, logvar, noise = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    raw_sample = mean + torch.exp(0.5 * logvar) * noise
    noise = measured_layout(noise, "patch") if kind == "patch" else noise
    sample = normalization.normalize(mean) + torch.exp(0.5 * normalization.normalize_logvar(logvar)) * noise
    torch.testing.assert_close(sample, normalization.normalize(raw_sample))


@pytest.mark.parametrize("kind", ["scalar", "channel", "patch"])
def test_fitted_normalisation_gives_unit_statistics(kind):
    spread, offset = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1), torch.arange(4.0).view(1, 4, 1, 1)
    z = torch.randn(64, 4, 8, 8) * spread + offset
    statistics = LatentStatistics()
    for chunk in z.split(10):  # merged batch by batch, exactly
        statistics.update(measured_layout(chunk, kind))
    normalization = LatentNormalization.fit(statistics, kind, eps=0.0)
    normalized = normalization.normalize(z.double()).transpose(0, 1).flatten(1)  # (channels, values)
    if kind == "scalar":
        assert normalized.mean().item() == pytest.approx(0.0, abs=1e-9)
        assert normalized.std().item() == pytest.approx(1.0, rel=1e-6)
    else:  # every channel on its own: what one scalar cannot do for channels of different spreads
        torch.testing.assert_close(normalized.mean(1), torch.zeros(len(normalized), dtype=torch.float64))
        torch.testing.assert_close(normalized.std(1), torch.ones(len(normalized), dtype=torch.float64))


@pytest.mark.parametrize("kind", ["scalar", "channel", "patch"])
def test_a_vae_declares_what_was_applied_and_keeps_it_through_save_and_load(kind, tmp_path):
    architecture = "flux2" if kind == "patch" else "sd"
    vae = vaegan.AutoencoderKL(vaegan.preset(architecture, **TINY_F8, latent_channels=4))
    normalization = kinds()[kind]
    normalization.apply_to(vae)
    loaded = vaegan.load(vaegan.save(vae, tmp_path / "vae"))
    declared = LatentNormalization.of(loaded)
    assert declared.kind == kind and declared.patch_size == normalization.patch_size
    assert declared.scaling_factor == pytest.approx(normalization.scaling_factor)
    assert declared.shift_factor == pytest.approx(normalization.shift_factor)
    if kind != "scalar":
        assert declared.mean == pytest.approx(normalization.mean, rel=1e-6)
        assert declared.std == pytest.approx(normalization.std, rel=1e-6)
    codec = vaegan.Codec(loaded)
    latents = codec.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert latents.shape == ((1, 16, 2, 2) if kind == "patch" else (1, 4, 4, 4))
    assert codec.decode(latents).shape == (1, 3, 32, 32)


def test_a_patch_normalisation_needs_flux2s_statistics():
    with pytest.raises(ValueError, match="patch_size=None"):
        kinds()["patch"].apply_to(vaegan.AutoencoderKL(vaegan.preset("sd", **TINY_F8)))


def test_the_scalar_formula_reads_as_written():
    # A negative shift is added, not subtracted twice ("(z - -0.84588)").
    for shift, formula in ((-0.84588, "(z + 0.84588) * 3.2"), (0.1159, "(z - 0.1159) * 3.2"), (0.0, "(z - 0) * 3.2")):
        vae = vaegan.AutoencoderKL(vaegan.preset("mini", scaling_factor=3.2, shift_factor=shift))
        assert str(LatentNormalization.of(vae)) == formula
