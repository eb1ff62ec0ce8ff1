"""A run made before the subpackage layout (tests/train/assets/pre-layout: the flat package, flat regulariser options,
the `tiny` preset) resumes with today's code and ends bit for bit where the old code's uninterrupted run ended,
and exports to the same VAE file."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

OLD_RUN = Path(__file__).resolve().parent / "assets" / "pre-layout"
# The photos the old run trained and validated on (see its README).
TRAIN_PHOTOS = ["100075", "100080", "100098", "103041", "104022", "105019", "105053", "106020"]
VAL_PHOTOS = ["100007", "100039"]


@pytest.fixture
def old_run(assets, tmp_path) -> Path:
    """A folder laid out as the old run's was: its config, its photos, its batch-2 checkpoint."""
    for split, folder, names in (("train", "train", TRAIN_PHOTOS), ("test", "val", VAL_PHOTOS)):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(assets / "bsds500" / split / f"{name}.jpg", tmp_path / "photos" / folder)
    shutil.copy(OLD_RUN / "config.yaml", tmp_path)
    shutil.copy(OLD_RUN / "batch-2.ckpt", tmp_path)
    return tmp_path


def vaegan_command(folder: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaegan", *arguments], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_an_old_checkpoint_resumes_to_the_old_runs_end(old_run):
    result = vaegan_command(old_run, "fit", "--config", "config.yaml", "--ckpt_path", "batch-2.ckpt")
    assert result.returncode == 0, result.stderr[-3000:]
    # Each old spelling is read and said so: the config's and the checkpoint's flat options, the old preset name.
    assert "config.yaml: the regulariser options are grouped now" in result.stderr
    assert "batch-2.ckpt: the regulariser options are grouped now" in result.stderr
    assert "eq_weight" in result.stderr and "eq.weight" in result.stderr
    assert "the preset 'tiny' is now called 'mini'" in result.stderr
    resumed = torch.load(old_run / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    expected = load_file(OLD_RUN / "batch-4-state.safetensors")
    assert int(resumed["state_dict"]["batches_seen"]) == 4
    assert resumed["state_dict"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(resumed["state_dict"][key], value), key
    # The new checkpoint holds the options grouped, as plain containers.
    assert resumed["hyper_parameters"]["eq"]["weight"] == 0.1 and "eq_weight" not in resumed["hyper_parameters"]


def test_an_old_checkpoint_exports_the_same_vae(old_run):
    result = vaegan_command(old_run, "export", "batch-2.ckpt", "exported", "--data", "photos/train",
                            "--resolution", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    exported, expected = load_file(old_run / "exported" / "diffusion_pytorch_model.safetensors"), load_file(
        OLD_RUN / "exported-batch-2.safetensors")
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    config = json.loads((old_run / "exported" / "config.json").read_text())
    assert config == json.loads((OLD_RUN / "exported-batch-2-config.json").read_text())
