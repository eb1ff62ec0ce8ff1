"""The `vaegan` command's VAE tools, called through its entry point."""

import json

import pytest
import torch
from conftest import skimage_photos

import vaegan
from vaegan.cli import main


def test_convert_and_info_round_trip(tmp_path, capsys):
    vae = vaegan.AutoencoderKL.from_preset("tiny")
    source = vaegan.save(vae, tmp_path / "tiny", format="diffusers")
    main(["convert", str(source), str(tmp_path / "tiny.safetensors"), "--to", "single-file"])
    main(["info", str(tmp_path / "tiny.safetensors"), "--size", "[256]", "--format", "json"])
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["latent_shape"] == [4, 64, 64] and summary["parameters"] == vae.num_parameters()
    converted = vaegan.load(tmp_path / "tiny.safetensors")
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value)


def test_convert_names_the_bad_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(vaegan.FormatError, match="broken.safetensors"):
        main(["convert", str(bad), str(tmp_path / "out"), "--to", "diffusers"])


@pytest.mark.parametrize("command", ["convert", "info", "export", "eval", "encode", "decode", "probe"])
def test_every_command_takes_its_options_from_one_typed_signature(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert "--config CONFIG" in shown and "--print_config" in shown and "(type: " in shown


def test_encode_reads_its_options_from_a_config_file(tmp_path, capsys):
    model = vaegan.save(vaegan.AutoencoderKL.from_preset("tiny"), tmp_path / "vae")
    images = skimage_photos(tmp_path / "images", 3)
    with pytest.raises(SystemExit):  # --print_config prints and stops, as for `vaegan fit`
        main(["encode", "--model", str(model), "--input", str(images), "--output", str(tmp_path / "latents"),
              "--crop", "32", "--device", "cpu", "--num_workers", "0", "--progress", "false", "--print_config"])
    config = tmp_path / "encode.yaml"
    config.write_text(capsys.readouterr().out)
    assert "crop: 32" in config.read_text()
    main(["encode", "--config", str(config)])
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["encoded"] == 3
