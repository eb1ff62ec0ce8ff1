"""Tiny autoencoders on disk: TAESD's original pair, diffusers' AutoencoderTiny folders, single files."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import load_file, save_file

import vaegan
from vaegan.autoencoder.tiny import MissingPart, TinyAutoencoder
from vaegan.cli import main


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def test_taef2_loads_from_its_folder_or_either_file(assets):
    folder = assets / "taesd"
    whole = vaegan.load(folder)
    assert isinstance(whole, TinyAutoencoder) and whole.config.midblock_pool and whole.config.latent_channels == 32
    for name in ("taef2_encoder.pth", "taef2_decoder.pth"):
        assert same_weights(vaegan.load(folder / name), whole)
    assert next(whole.parameters()).dtype == torch.float32  # stored as fp16, loaded in the highest precision


def test_a_decoder_alone_loads_and_names_the_missing_encoder(assets, tmp_path):
    shutil.copy(assets / "taesd" / "taef2_decoder.pth", tmp_path)
    previewer = vaegan.load(tmp_path / "taef2_decoder.pth")
    assert previewer.encoder is None and previewer.config.downsampling_factor == 8
    codec = vaegan.Codec(previewer)
    assert codec.decode(torch.zeros(1, 128, 2, 2)).shape == (1, 3, 32, 32)
    with pytest.raises(MissingPart, match=r"taef2_decoder\.pth hold no encoder.*_encoder\.pth"):
        codec.encode(torch.zeros(1, 3, 32, 32))


def test_the_classic_variant_round_trips_through_diffusers_both_ways(tmp_path):
    torch.manual_seed(0)
    ours = TinyAutoencoder.from_preset("taesd")
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = torch.randn(2, 4, 8, 12)
    vaegan.save(ours, tmp_path / "ours", format="diffusers")
    theirs = AutoencoderTiny.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(images).latents, ours.encode(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs.decode(latents).sample, ours.decode(latents), rtol=0, atol=1e-5)
        # And back: diffusers' own folder loads as the same network.
        theirs.save_pretrained(tmp_path / "theirs")
        back = vaegan.load(tmp_path / "theirs")
        assert same_weights(back, ours)
        torch.testing.assert_close(back.decode(latents), theirs.decode(latents).sample, rtol=0, atol=1e-5)


@pytest.mark.parametrize("format", ["pair", "single-file"])
def test_taef2_round_trips_in_the_formats_that_hold_it(assets, tmp_path, format):
    taef2 = vaegan.load(assets / "taesd")
    target = tmp_path / ("taef2" if format == "pair" else "taef2.safetensors")
    vaegan.save(taef2, target, format=format)
    if format == "pair":
        assert sorted(p.name for p in target.iterdir()) == ["taef2_decoder.safetensors", "taef2_encoder.safetensors"]
        # Original naming: the decoder's clamp is layer 0, so its first conv is layer 1.
        assert "1.weight" in load_file(target / "taef2_decoder.safetensors")
    again = vaegan.load(target)
    assert same_weights(again, taef2) and again.config == taef2.config
    with pytest.raises(ValueError, match="AutoencoderTiny has one width"):
        vaegan.save(taef2, tmp_path / "diffusers", format="diffusers")


def test_a_custom_width_student_round_trips_as_a_pair(tmp_path):
    student = TinyAutoencoder.from_preset("taesana", latent_channels=8)
    vaegan.save(student, tmp_path / "student", format="pair")
    for file in (tmp_path / "student").iterdir():  # without our metadata the shapes alone must tell the network
        save_file(load_file(file), str(file))
    assert vaegan.load(tmp_path / "student").config == student.config


def test_loading_is_strict_and_names_the_tensor(assets, tmp_path):
    state = {k: v for k, v in torch.load(assets / "taesd" / "taef2_decoder.pth", weights_only=True).items()}
    del state["4.pool.3.weight"]
    save_file(state, str(tmp_path / "taef2_decoder.safetensors"))
    with pytest.raises(vaegan.FormatError, match=r"missing keys: decoder\.layers\.3\.pool\.3\.weight"):
        vaegan.load(tmp_path / "taef2_decoder.safetensors")
    (tmp_path / "taef2_decoder.safetensors").write_bytes(b"not a file")
    with pytest.raises(vaegan.FormatError, match="taef2_decoder.safetensors is not a readable safetensors file"):
        vaegan.load(tmp_path)


def test_tiny_autoencoders_refuse_big_vae_options(assets):
    with pytest.raises(vaegan.FormatError, match="already normalised"):
        vaegan.load(assets / "taesd", scaling_factor=0.18215)


def test_a_big_vae_is_not_taken_for_a_tiny_one(tmp_path):
    vae = vaegan.AutoencoderKL.from_preset("mini")
    path = vaegan.save(vae, tmp_path / "vae.safetensors", format="single-file")
    assert isinstance(vaegan.load(path), vaegan.AutoencoderKL)
    assert isinstance(vaegan.load(vaegan.save(vae, Path(tmp_path / "folder"))), vaegan.AutoencoderKL)


def test_info_and_convert_speak_tiny_autoencoders(assets, tmp_path, capsys):
    main(["info", str(assets / "taesd"), "--size", "[256]", "--format", "json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"]["midblock_pool"] and summary["normalized_latent_shape"] == [128, 16, 16]
    assert summary["encoder_parameters"] == 1_338_528 and summary["decoder_parameters"] == 1_338_499
    main(["convert", str(assets / "taesd"), str(tmp_path / "taef2"), "--to", "pair"])
    assert same_weights(vaegan.load(tmp_path / "taef2"), vaegan.load(assets / "taesd"))
    main(["info", str(tmp_path / "taef2")])
    assert "already in its teacher's normalised space" in capsys.readouterr().out
