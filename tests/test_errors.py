"""Every mistake a user makes gets one line: each bad input below, run through the `vaegan` command, ends with
status 2, at most three lines on stderr and no traceback, names the option or file as the user wrote it, and
writes or changes nothing in the folder it ran in."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vaegan
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.latents.encode import encode_dataset

from conftest import skimage_photos


class Evil:
    """A pickle payload: what a malicious .pt or .ckpt would run if it were unpickled."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder of the files the bad inputs name."""
    folder = tmp_path_factory.mktemp("workspace")
    vaegan.save(vaegan.AutoencoderKL(vaegan.preset("mini")), folder / "vae")
    vaegan.save(vaegan.AutoencoderKL(vaegan.preset("mini")), folder / "vae.safetensors", format="single-file")
    vaegan.save(TinyAutoencoder.from_preset("taesd", latent_channels=16), folder / "tiny16")
    (folder / "misspelt.yaml").write_text("model:\n  kl_wieght: 1.0e-6\n")
    (folder / "encode.yaml").write_text("model: vae\ninput: images\noutput: latents\ncrpo: 32\n")
    torch.save({"latents": Evil()}, folder / "evil.pt")
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": Evil()}}, folder / "evil.ckpt")
    whole = folder / "whole.pt"
    torch.save(torch.randn(1, 4, 8, 8), whole)
    (folder / "truncated.pt").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    nan = torch.randn(2, 4, 8, 8)
    nan[0, 0, 0, 0] = float("nan")
    torch.save(nan, folder / "nan.pt")
    (folder / "images").mkdir()
    (folder / "images" / "notes.txt").write_text("not an image")
    encode_dataset(folder / "vae", skimage_photos(folder / "photos", 3), folder / "encoded", crop=32,
                   num_workers=0, device="cpu", progress=False)
    return folder


DECODE = ["--output", "decoded", "--model", "vae", "--device", "cpu"]
ENCODE = ["--model", "vae", "--input", "images", "--output", "latents", "--device", "cpu"]
# (arguments, what the line must say)
BAD_INPUTS = [
    (["fit", "--config", "misspelt.yaml"], "misspelt.yaml: unknown key model.kl_wieght (did you mean model.kl_weight"),
    (["fit", "--model.lrr", "1"], "unknown option --model.lrr (did you mean --model.lr?)"),
    (["fit", "--model.lr", "-1e-3"], "--model.lr: a negative value is read as an option; write it as --model.lr=-1e-3"),
    (["fit", "--model.lr=-1e-3"], "--model.lr=-0.001: a learning rate must be positive"),
    (["fit", "--model.lr", "fast"], "--model.lr: 'fast' is not a number"),
    (["fit", "--model.perceptual_net", "squeeze", "--data.val_holdout", "2"],
     "--data.val_holdout=2.0 must be a fraction in [0, 1)"),
    (["fit", "--model.gan_loss", "hinje"], "--model.gan_loss: 'hinje' is not one of 'hinge', 'vanilla'"),
    (["fit", "--model.eq.wieght", "1"], "unknown option --model.eq.wieght (did you mean --model.eq.weight?)"),
    (["fit", "--ckpt_path", "evil.ckpt"], "evil.ckpt is not a readable checkpoint"),
    (["fit", "--ckpt_path", "truncated.pt"], "truncated.pt is not a complete checkpoint"),
    (["encode", *ENCODE, "--cropp", "32"], "unknown option --cropp (did you mean --crop?)"),
    (["encode", *ENCODE, "--crop", "large"], "--crop: 'large' is not an integer or null"),
    (["encode", *ENCODE, "--dtype", "fp64"], "--dtype: 'fp64' is not one of 'fp32', 'bf16', 'fp16'"),
    (["encode", "--config", "encode.yaml"], "encode.yaml: unknown key crpo (did you mean crop?)"),
    (["encode", "--model", "vae"], "missing --input, --output"),
    (["encode", *ENCODE, "--crop", "32"], "images is a folder with neither images (.bmp, .gif"),
    (["encode", "--model", "vae", "--input", "photos", "--output", "encoded", "--crop", "64", "--device", "cpu",
      "--num_processes", "2", "--num_workers", "0", "--progress", "false"],
     'encoded holds latents encoded with other settings or from a changed source (resolution: {"policy": "crop", '
     '"size": 32'),
    (["decode", "--input", "evil.pt", *DECODE], "evil.pt is not a readable latent file"),
    (["decode", "--input", "truncated.pt", *DECODE], "truncated.pt is not a readable latent file"),
    (["decode", "--input", "nan.pt", *DECODE], "nan.pt, latent nan-00000: 1 of 256 latent values are not finite"),
    (["decode", "--input", "whole.pt", *DECODE, "--preview", "true"],
     "--preview: vae stores no latent preview map; `vaegan convert vae OUTPUT --fit_preview IMAGES` fits one"),
    (["fit", "--model.teacher", "no-such-vae"], "no-such-vae does not exist"),
    (["fit", "--model.perceptual_net", "squeeze", "--data.latents", "nowhere"],
     "--data.latents: nowhere: no such latent folder or shard file"),
    (["fit", "--model.perceptual_net", "squeeze", "--data.latents", "encoded", "--data.resolution", "32"],
     "--data.latents=encoded holds a teacher's latents, for distillation; name the VAE that encoded them with "
     "--model.teacher"),
    (["fit", "--model.perceptual_net", "squeeze", "--model.teacher", "vae.safetensors", "--data.latents", "encoded",
      "--data.resolution", "32"], "--data.latents=encoded was encoded by other weights than "
     "--model.teacher=vae.safetensors; encode the images with the teacher"),
    (["fit", "--model.teacher", "vae", "--model.arch", "taesana"],
     "--model.arch=taesana downsamples 32x but the teacher vae downsamples 4x"),
    (["fit", "--model.teacher", "vae", "--model.init_from", "tiny16"],
     "--model.init_from=tiny16 is not a tiny autoencoder with the teacher's 4 latent channels at 1/4"),
    (["export", "vae.safetensors", "exported"], "vae.safetensors is a VAE, not a training checkpoint: `vaegan convert"),
    (["convert", "vae", "out.safetensors", "--to", "single-file", "--dtype", "fp64"],
     "--dtype: 'fp64' is not one of 'fp32', 'bf16', 'fp16', 'float32', 'bfloat16', 'float16' or null"),
    (["eval", "--modles+", "vae", "--data", "images"], "unknown option --modles+ (did you mean --models+?)"),
    (["eval", "--models+", "vae", "--data", "images", "--lpips+", "alex"],
     "--lpips+: --lpips is given whole, not appended to: write --lpips [a, b]"),
    (["info", "missing-vae"], "missing-vae"),
    (["train"], "unknown command 'train'"),
]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("arguments, expected", BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_a_bad_input_gets_one_line_and_status_2(workspace, arguments, expected):
    before = snapshot(workspace)
    result = subprocess.run([sys.executable, "-m", "vaegan", *arguments], cwd=workspace, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) <= 3, result.stderr
    assert lines[-1].startswith(f"vaegan {arguments[0]}: error: ") and expected in lines[-1], lines[-1]
    assert snapshot(workspace) == before, "the refused command wrote or changed files"
    assert not (workspace / "PWNED").exists()
