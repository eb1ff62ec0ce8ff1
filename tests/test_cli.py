"""The `vaegan` command's VAE tools, called through its entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vaegan
from vaegan.cli import main

from conftest import skimage_photos


def test_convert_and_info_round_trip(tmp_path, capsys):
    vae = vaegan.AutoencoderKL.from_preset("mini")
    source = vaegan.save(vae, tmp_path / "tiny", format="diffusers")
    main(["convert", str(source), str(tmp_path / "tiny.safetensors"), "--to", "single-file"])
    main(["info", str(tmp_path / "tiny.safetensors"), "--size", "[256]", "--format", "json"])
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["latent_shape"] == [4, 64, 64] and summary["parameters"] == vae.num_parameters()
    converted = vaegan.load(tmp_path / "tiny.safetensors")
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value)


@pytest.mark.parametrize("dtype", ["fp16", "float16"])
def test_convert_takes_the_precision_as_every_command_spells_it(tmp_path, dtype):
    source = vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), tmp_path / "vae")
    main(["convert", str(source), str(tmp_path / "half.safetensors"), "--to", "single-file", "--dtype", dtype])
    from safetensors.torch import load_file

    assert {tensor.dtype for tensor in load_file(tmp_path / "half.safetensors").values()} == {torch.float16}


def test_info_says_a_training_checkpoints_factors_are_not_measured_yet(tmp_path, capsys):
    checkpoint = Path(__file__).parent / "train" / "assets" / "pre-layout" / "batch-2.ckpt"
    main(["info", str(checkpoint), "--format", "json"])
    assert json.loads(capsys.readouterr().out)["normalization_measured"] is False
    main(["info", str(checkpoint)])
    assert "`vaegan export` measures them on the training images" in capsys.readouterr().out
    exported = vaegan.save(vaegan.load(checkpoint), tmp_path / "vae")
    main(["info", str(exported), "--format", "json"])
    assert json.loads(capsys.readouterr().out)["normalization_measured"] is True


def test_convert_names_the_bad_file_in_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit) as exited:
        main(["convert", str(bad), str(tmp_path / "out"), "--to", "diffusers"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"vaegan convert: error: {bad} is not a readable safetensors file")
    assert error.count("\n") == 1
    with pytest.raises(SystemExit) as exited:  # --debug: the traceback, and still status 2
        main(["convert", str(bad), str(tmp_path / "out"), "--to", "diffusers", "--debug"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback (most recent call last)" in error and "FormatError:" in error and "broken.safetensors" in error


@pytest.mark.parametrize("format, name", [("single-file", "vae.safetensors"), ("diffusers", "vae")])
def test_export_of_a_vae_points_to_convert(tmp_path, capsys, format, name):
    vae = vaegan.save(vaegan.AutoencoderKL(vaegan.preset("mini")), tmp_path / name, format=format)
    with pytest.raises(SystemExit) as exited:
        main(["export", str(vae), str(tmp_path / "out")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"vaegan export: error: {vae} is a VAE, not a training checkpoint: `vaegan convert {vae} OUTPUT --to "
        "diffusers` (or --to single-file) writes it in another format\n"
    )
    assert not (tmp_path / "out").exists()


def test_missing_lpips_weights_end_eval_with_one_line_and_status_2(tmp_path):
    # The first thing a new user meets without $VAEGAN_WEIGHTS_DIR, run as they run it.
    model = vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), tmp_path / "vae")
    images = skimage_photos(tmp_path / "images", 2)
    environment = {key: value for key, value in os.environ.items() if key != "VAEGAN_WEIGHTS_DIR"}
    environment |= {"TORCH_HOME": str(tmp_path / "empty-torch-cache"), "VAEGAN_OFFLINE": "1"}
    command = [sys.executable, "-m", "vaegan.cli", "eval", "--models+", str(model), "--data", str(images),
               "--output", str(tmp_path / "report"), "--progress", "false"]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("vaegan eval: error: No ImageNet weights for the LPIPS-alex backbone")
    assert "alexnet_features.safetensors" in result.stderr and result.stderr.count("\n") == 1


def test_a_hub_dataset_not_cached_offline_is_one_line(tmp_path, capsys):
    model = vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), tmp_path / "vae")
    with pytest.raises(SystemExit) as exited:  # HF_HUB_OFFLINE=1, as in every test
        main(["eval", "--models+", str(model), "--data", "someone/not-cached-here", "--output",
              str(tmp_path / "report"), "--progress", "false"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("vaegan eval: error: Couldn't reach 'someone/not-cached-here'")


def test_bad_option_values_and_unknown_commands_read_like_errors(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--model.perceptual_net", "squeeze", "--data.val_holdout", "2", "--trainer.logger", "false"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "vaegan fit: error: --data.val_holdout=2.0 must be a fraction in [0, 1)"
    )
    with pytest.raises(SystemExit) as exited:
        main(["train"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "vaegan train: error: unknown command 'train'; `vaegan --help` lists the commands\n"
    )
    monkeypatch.setenv("VAEGAN_DEBUG", "1")  # the traceback, and still status 2
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--model.perceptual_net", "squeeze", "--data.val_holdout", "2", "--trainer.logger", "false"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback (most recent call last):" in error and error.rstrip().endswith(
        "ValueError: --data.val_holdout=2.0 must be a fraction in [0, 1)")


def test_a_reader_that_closes_early_gets_no_broken_pipe_complaint(tmp_path):
    vae = vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), tmp_path / "vae")
    reader = subprocess.run(f"{sys.executable} -m vaegan info {vae} --format json | head -c 1", shell=True,
                            capture_output=True, text=True, timeout=120)
    assert reader.stdout == "{" and reader.stderr == ""


@pytest.mark.parametrize("command", ["convert", "info", "export", "eval", "encode", "decode", "probe"])
def test_every_command_takes_its_options_from_one_typed_signature(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert "--config CONFIG" in shown and "--print_config" in shown and "(type: " in shown
    description = shown.split("\n\n")[1]  # after the usage lines
    assert description.rstrip().endswith("."), f"vaegan {command} --help stops mid-sentence: {description!r}"


def test_encode_reads_its_options_from_a_config_file(tmp_path, capsys):
    model = vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), tmp_path / "vae")
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


def test_encode_takes_where_jpegs_are_decoded(tmp_path, capsys):
    arguments = ["encode", "--model", "vae", "--input", "images", "--output", "latents", "--crop", "32"]
    with pytest.raises(SystemExit):
        main([*arguments, "--decode_jpeg", "device", "--print_config"])
    assert "decode_jpeg: device" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*arguments, "--help"])
    assert "decode_jpeg" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main([*arguments, "--decode_jpeg", "gpu"])
    assert exited.value.code != 0


RECIPES = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", [path for path in RECIPES if not path.stem.startswith("probe")],
                         ids=lambda p: p.stem)
def test_every_recipe_parses_into_the_training_signatures(recipe, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exited.value.code == 0
    assert "model:" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", [path for path in RECIPES if path.stem.startswith("probe")], ids=lambda p: p.stem)
def test_every_probe_recipe_parses_into_the_probe_signature(recipe, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["probe", "--config", str(recipe), "--print_config"])
    assert exited.value.code == 0
    assert "width: 768" in capsys.readouterr().out
