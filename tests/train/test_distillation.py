"""Distilling a tiny autoencoder: the teacher stays frozen, a killed run resumes exactly, the student exports
and loads, and wrong teachers are refused by name."""

import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import AutoencoderTiny
from training_runs import PHOTOS, batches_of, fit, kill_at, last_checkpoint, resume

import vaegan
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.cli import main
from vaegan.train.data import ImageDataModule
from vaegan.train.module import VAEGAN

from conftest import bsds_photos


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A small f4 VAE saved as a diffusers folder (its weights random: distillation needs no good teacher)."""
    torch.manual_seed(0)
    return vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), tmp_path_factory.mktemp("teacher") / "vae")


@pytest.fixture(scope="module")
def photos(assets, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("photos")
    return bsds_photos(assets, folder, "train", PHOTOS), bsds_photos(assets, folder, "test", 2)


def student_options(teacher: Path) -> dict:
    return dict(teacher=str(teacher), block_out_channels=[16, 16, 16], teacher_decode_weight=0.5,
                teacher_latents="sample", betas=[0.9, 0.9])


def test_the_teacher_gets_no_gradient_and_no_update(teacher, photos, tmp_path):
    L.seed_everything(0)
    data = ImageDataModule(source=str(photos[0]), val_source=str(photos[1]), resolution=32, batch_size=4,
                           num_workers=0, min_size=32)
    module = VAEGAN(perceptual_net="squeeze", disc_channels=16, disc_layers=2, disc_start=1, max_batches=3,
                    **student_options(teacher))
    before = {key: value.clone() for key, value in module.teacher.state_dict().items()}
    student_before = module.vae.decoder.layers[0].weight.clone()
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path,
                        limit_val_batches=1, val_check_interval=3, check_val_every_n_epoch=None,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, data)
    assert isinstance(module.vae, TinyAutoencoder) and module.vae.config.downsampling_factor == 4
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    optimized = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.teacher.parameters()}
    assert not torch.equal(module.vae.decoder.layers[0].weight, student_before)  # the student did learn
    logged = trainer.callback_metrics
    assert {"val/psnr_to_teacher", "val/latent_mse", "val/encoder_psnr", "train/latent"} <= set(logged)


@pytest.mark.slow
def test_a_killed_distillation_resumes_exactly_and_exports_its_student(teacher, photos, tmp_path):
    teacher = Path(shutil.copytree(teacher, tmp_path / "teacher"))  # replaced below
    model = student_options(teacher)
    reference = fit(tmp_path / "uninterrupted", photos, model=model)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = last_checkpoint(tmp_path / "uninterrupted")

    run = tmp_path / "killed"
    killed = fit(run, photos, callbacks=(kill_at(11),), model=model)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert batches_of(last_checkpoint(run)) == 9
    resumed = resume(run, photos, model=model)
    assert resumed["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    torch.testing.assert_close(resumed["optimizer_states"], expected["optimizer_states"], rtol=0, atol=0)

    # The teacher is read from its path, not stored; the checkpoint is the student that `vaegan.load` reads.
    assert not [key for key in expected["state_dict"] if key.startswith("teacher.")]
    student = vaegan.load(run / "checkpoints" / "last.ckpt")
    assert isinstance(student, TinyAutoencoder) and student.config.teacher == str(teacher)
    for key, value in student.state_dict().items():
        assert torch.equal(value, expected["state_dict"][f"ema.{key}"]), key
    # Exported, it is a diffusers AutoencoderTiny (one width throughout) with a card naming its teacher, or the pair.
    main(["export", str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "student")])
    assert str(teacher) in (tmp_path / "student" / "README.md").read_text()
    theirs = AutoencoderTiny.from_pretrained(tmp_path / "student").eval()
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(latents).sample, student.decode(latents), rtol=0, atol=1e-5)
    main(["export", str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "pair"), "--format", "pair"])
    assert sorted(path.name for path in (tmp_path / "pair").glob("*.safetensors")) == [
        "pair_decoder.safetensors", "pair_encoder.safetensors"]

    # A teacher whose weights changed since is refused on resume, by its option.
    torch.manual_seed(1)
    vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), teacher)
    refused = fit(run, photos, "--ckpt_path", "last", model=model)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"--model.teacher={teacher} holds other weights" in refused.stderr.strip().splitlines()[-1]
