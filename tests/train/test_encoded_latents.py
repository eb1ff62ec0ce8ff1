"""Distilling from latents encoded once (`--data.latents`): each stored latent comes with the crop of the image it
was encoded from, training reads them instead of running the teacher, and latents that are not the teacher's are
refused by name."""

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

import vaegan
from vaegan.latents.encode import encode_dataset
from vaegan.train.data import ImageDataModule
from vaegan.train.distillation import Teacher, check_stored_latents
from vaegan.train.items import Sample
from vaegan.train.module import VAEGAN

from conftest import bsds_photos

ENCODED_AT = 48  # px; the f4 teacher's latents are 12 x 12


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), tmp_path_factory.mktemp("teacher") / "vae")


@pytest.fixture(scope="module")
def encoded(assets, teacher, tmp_path_factory) -> Path:
    """12 BSDS500 photos and a truncated JPEG, encoded by the teacher (posterior, fp32) at 48 x 48."""
    folder = tmp_path_factory.mktemp("encoded")
    photos = bsds_photos(assets, folder, "train", 12, corrupt=True)
    summary = encode_dataset(teacher, photos, folder / "latents", crop=ENCODED_AT, latent_dtype="fp32", shard_size=5,
                             num_workers=0, device="cpu", progress=False)
    assert summary.errors == 1
    return folder / "latents"


def data_module(encoded: Path, resolution: int, **options) -> ImageDataModule:
    data = ImageDataModule(latents=str(encoded), resolution=resolution, batch_size=4, num_workers=0, val_count=2,
                           min_size=32, **options)
    data.setup("fit")
    return data


def test_each_stored_latent_comes_with_the_pixels_it_was_encoded_from(teacher, encoded):
    data = data_module(encoded, ENCODED_AT)
    assert len(data.train_dataset) == 10 and len(data.val_dataset) == 2  # 12 photos encoded, 2 held out
    encoder = Teacher(str(teacher))
    for index in range(len(data.train_dataset)):
        item = data.train_dataset[Sample(index, seed=index)]
        assert item["image"].shape == (3, ENCODED_AT, ENCODED_AT) and item["logvar"].shape == item["latent"].shape
        torch.testing.assert_close(item["latent"][None], encoder.latents(item["image"][None]), rtol=0, atol=1e-4)


def test_training_crops_take_the_same_window_of_latent_and_image(encoded):
    whole = data_module(encoded, ENCODED_AT).train_dataset
    cropped = data_module(encoded, 32).train_dataset
    offsets = set()
    for seed in range(6):
        item, full = cropped[Sample(seed % 3, seed)], whole[seed % 3]
        # Where the 8 x 8 latent window sits in the 12 x 12 latent: exactly one place fits it.
        places = [(top, left) for top in range(5) for left in range(5)
                  if torch.equal(full["latent"][:, top:top + 8, left:left + 8], item["latent"])]
        assert len(places) == 1
        top, left = places[0]
        assert torch.equal(item["image"], full["image"][:, top * 4:top * 4 + 32, left * 4:left * 4 + 32])
        assert torch.equal(item["logvar"], full["logvar"][:, top:top + 8, left:left + 8])
        assert torch.equal(cropped[Sample(seed % 3, seed)]["latent"], item["latent"])  # the seed decides
        offsets.add(places[0])
    assert len(offsets) > 1


def test_training_reads_the_stored_latents_instead_of_running_the_teacher(teacher, encoded, tmp_path):
    L.seed_everything(0)
    module = VAEGAN(perceptual_net="squeeze", disc_channels=16, disc_layers=2, disc_start=1, max_batches=3,
                    teacher=str(teacher), block_out_channels=[16, 16, 16], teacher_latents="sample")
    calls = {"training": 0, "validation": 0}
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, limit_val_batches=1, val_check_interval=3,
                        check_val_every_n_epoch=None, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    module.teacher.vae.encoder.register_forward_hook(
        lambda *_: calls.__setitem__(phase := "training" if trainer.training else "validation", calls[phase] + 1))
    student_before = module.vae.decoder.layers[0].weight.clone()
    trainer.fit(module, data_module(encoded, 32))
    assert int(module.batches_seen) == 3 and calls == {"training": 0, "validation": 1}
    assert not torch.equal(module.vae.decoder.layers[0].weight, student_before)
    assert {"val/psnr_to_teacher", "train/latent"} <= set(trainer.callback_metrics)


def test_latents_that_are_not_the_teachers_targets_are_refused(teacher, encoded, tmp_path):
    stored = data_module(encoded, 32).encoded
    with pytest.raises(ValueError, match="holds a teacher's latents, for distillation; name the VAE"):
        check_stored_latents(None, stored, "mean")
    torch.manual_seed(1)
    other = Teacher(str(vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), tmp_path / "other")))
    with pytest.raises(ValueError, match=f"was encoded by other weights than --model.teacher={tmp_path / 'other'}"):
        check_stored_latents(other, stored, "mean")
    check_stored_latents(Teacher(str(teacher)), stored, "sample")

    # The images moved: the manifest's folder is gone, and --data.source says where they are now.
    photos = tmp_path / "moved"
    shutil.copytree(encoded.parent / "train", photos)
    manifest_source = encoded.parent / "train"
    shutil.move(manifest_source, tmp_path / "away")
    try:
        with pytest.raises(ValueError, match="which is not there now; pass --data.source"):
            data_module(encoded, 32)
        assert len(data_module(encoded, 32, source=str(photos)).train_dataset) == 10
        (photos / "new.jpg").write_bytes((photos / "corrupt.jpg").read_bytes())
        with pytest.raises(ValueError, match="changed since they were encoded"):
            data_module(encoded, 32, source=str(photos))
    finally:
        shutil.move(tmp_path / "away", manifest_source)
