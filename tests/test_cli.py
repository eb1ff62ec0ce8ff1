"""The `vaegan` command's VAE tools, called through its entry point."""

import json

import pytest
import torch

import vaegan
from vaegan.cli import main


def test_convert_and_info_round_trip(tmp_path, capsys):
    vae = vaegan.AutoencoderKL.from_preset("tiny")
    source = vae.save(tmp_path / "tiny", format="diffusers")
    main(["convert", str(source), str(tmp_path / "tiny.safetensors"), "--to", "single-file"])
    main(["info", str(tmp_path / "tiny.safetensors"), "--size", "256", "--json"])
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
