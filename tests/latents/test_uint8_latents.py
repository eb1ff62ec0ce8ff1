"""uint8 latents: one affine map per channel, calibrated on the first images and shared by every shard and
rank; values within half a step of the exact ones; the printed cost is the decode PSNR it claims; values past
the calibrated range are clipped and counted."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaegan
from vaegan.latents import shard_encoder
from vaegan.latents.encode import encode_dataset
from vaegan.latents.quantization import column_maps

from conftest import bsds_photos


@pytest.fixture(scope="module")
def photos(assets, tmp_path_factory) -> Path:
    return bsds_photos(assets, tmp_path_factory.mktemp("photos"), "train", 20)


def test_uint8_latents_are_within_half_a_step_and_cost_what_the_summary_says(mini_vae, photos, tmp_path, capsys):
    options = dict(crop=128, shard_size=10, batch_size=4, num_workers=0, device="cpu")
    summary = encode_dataset(mini_vae, photos, tmp_path / "uint8", latent_dtype="uint8", **options)
    encode_dataset(mini_vae, photos, tmp_path / "fp32", latent_dtype="fp32", progress=False, **options)
    quantization = summary.manifest["quantization"]
    assert quantization["calibration_images"] == 20 and summary.manifest["counts"]["clipped_values"] == 0
    cost = quantization["cost"]
    printed = capsys.readouterr()
    assert f"{cost['decode_psnr_db']:.1f} dB PSNR against the exact latents' decode" in printed.out
    assert "shards 2/2, 0 errors, ETA 0:00:00" in printed.err  # the progress bar's words

    coded, exact = vaegan.LatentDataset(tmp_path / "uint8"), vaegan.LatentDataset(tmp_path / "fp32")
    assert coded.ids == exact.ids and coded.dtype == "uint8"
    maps = column_maps(quantization)
    for name in ("mean", "logvar"):
        half_step = torch.tensor(maps[name].step).view(-1, 1, 1) / 2
        for index in range(len(coded)):
            error = (coded.stored(index)[name] - exact.stored(index)[name]).abs()
            assert bool((error <= half_step * 1.001 + 1e-6).all()), (name, index)
    # The printed cost is the decode of the stored codes against the decode of the exact latents.
    codec = vaegan.Codec(vaegan.load(mini_vae))
    first = range(cost["images"])
    approximate = codec.decode(torch.stack([coded.stored(i)["mean"] for i in first]), output="uint8").float()
    reference = codec.decode(torch.stack([exact.stored(i)["mean"] for i in first]), output="uint8").float()
    psnr = 10 * np.log10(255**2 / float(((approximate - reference) ** 2).mean()))
    assert abs(psnr - cost["decode_psnr_db"]) < 0.05
    # Fewer bytes than fp32 by far (a quarter before compression, which favours neither much).
    assert summary.manifest["counts"]["bytes"] < 0.5 * json.loads(
        (tmp_path / "fp32" / "manifest.json").read_text())["counts"]["bytes"]


def test_every_rank_and_rerun_uses_the_first_calibration_and_clips_what_it_did_not_see(mini_vae, tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    # The first two images (the calibration) are flat grey; the rest are photos, far outside their latent range.
    for name in ("a0.png", "a1.png"):
        Image.new("RGB", (64, 64), (128, 128, 128)).save(images / name)
    for number, photo in enumerate(sorted((Path(__file__).parents[2].parent / "shared" / "assets" / "bsds500" /
                                           "test").glob("*.jpg"))[:6]):
        shutil.copy(photo, images / f"b{number}.jpg")
    monkeypatch.setattr(shard_encoder, "CALIBRATION_IMAGES", 2)
    out = tmp_path / "latents"
    summary = encode_dataset(mini_vae, images, out, crop=64, latent_dtype="uint8", shard_size=2, num_workers=0,
                             device="cpu", progress=False)
    assert summary.manifest["quantization"]["calibration_images"] == 2
    assert summary.manifest["counts"]["clipped_values"] > 0

    # Shards redone later, by two fresh processes (which would calibrate on 8 images), are coded with the
    # manifest's maps: the shards still agree.
    for shard in (1, 2):
        (out / ".progress" / f"shard-{shard:06d}.json").unlink()
        (out / f"train-{shard:06d}.parquet").unlink()
    again = encode_dataset(mini_vae, images, out, crop=64, latent_dtype="uint8", shard_size=2, num_processes=2,
                           num_workers=0, device="cpu", progress=False)
    assert again.encoded == 4 and again.manifest["quantization"] == summary.manifest["quantization"]
    assert len(vaegan.LatentDataset(out)) == 8  # opening checks that every shard carries the same maps
