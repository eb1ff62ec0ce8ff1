"""Dataset encoding: latents equal the codec's, bad files are listed not fatal, killed runs resume exactly once,
two processes share the work, and plain `datasets` reads the shards."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import vaegan
from vaegan.cli import main
from vaegan.images.buckets import ResolutionPolicy, make_buckets, nearest_bucket, resize_cover_crop
from vaegan.images.crops import resize_center_crop
from vaegan.images.reading import load_image
from vaegan.latents.encode import encode_dataset

from conftest import BAD_FILES, read_rows, skimage_photos

SCALE, SHIFT = 0.5, 0.1  # not the identity, so a mix-up of normalisation conventions shows


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vae = vaegan.AutoencoderKL(vaegan.preset("mini", scaling_factor=SCALE, shift_factor=SHIFT))
    return vaegan.save(vae, tmp_path_factory.mktemp("vae") / "tiny", format="diffusers")


def errors_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "errors.jsonl").read_text().splitlines()]


# --- resolution policies -----------------------------------------------------------------------------------


def test_buckets_follow_the_sdxl_convention():
    buckets = make_buckets(1024, 64)
    assert (1024, 1024) in buckets and (896, 1152) in buckets and (1152, 896) in buckets
    assert (512, 2048) in buckets and (2048, 512) in buckets  # 4:1 at the extremes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024**2 for w, h in buckets)
    assert sorted(buckets) == sorted((h, w) for w, h in buckets)  # symmetric
    assert all(max(w, h) / min(w, h) <= 4 for w, h in buckets)
    assert nearest_bucket(1920, 1080, buckets) == (1344, 768)  # 16:9 -> 1.75
    assert nearest_bucket(1000, 1000, buckets) == (1024, 1024)


def test_cover_crop_keeps_the_aspect_and_reports_the_box():
    image = Image.fromarray(skimage.data.coffee())  # 600x400
    crop, box = resize_cover_crop(image, 96, 48)  # 2:1 bucket from a 3:2 photo: the top and bottom are cut
    assert crop.size == (96, 48)
    assert box[0] == pytest.approx(0) and box[2] == pytest.approx(600)
    assert box[3] - box[1] == pytest.approx(300, abs=7)  # 600 * 48/96 source rows survive, centred
    assert box[1] + box[3] == pytest.approx(400, abs=7)


def test_policy_checks_against_the_vae():
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 8"):
        ResolutionPolicy.create("buckets", 512, factor=8, step=36)
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 8"):
        ResolutionPolicy.create("crop", 250, factor=8)
    capped = ResolutionPolicy.create("max-side", 64, factor=8)
    crop, box = capped.apply(Image.new("RGB", (200, 100)))  # 64x32 after capping: already multiples of 8
    assert crop.size == (64, 32) and box == pytest.approx((0, 0, 200, 100))
    crop, _ = capped.apply(Image.new("RGB", (50, 30)))  # never upscaled, cut to 48x24
    assert crop.size == (48, 24)


# --- encoding ------------------------------------------------------------------------------------------------


def test_encoded_latents_match_the_codec_and_decode_back(tiny_vae, tmp_path):
    images = skimage_photos(tmp_path / "images", 6)
    out = tmp_path / "latents"
    main(["encode", "--model", str(tiny_vae), "--input", str(images), "--output", str(out), "--crop", "32",
          "--latent_dtype", "fp32", "--batch_size", "4", "--shard_size", "4", "--num_workers", "1",
          "--progress", "false", "--device", "cpu"])
    rows = read_rows(out)
    assert sorted(row["id"] for row in rows) == sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    codec = vaegan.Codec(vaegan.load(tiny_vae))
    for row in rows:
        source = load_image(images / row["id"])
        crop, box = resize_center_crop(source, 32)
        posterior = codec.posterior(crop)
        torch.testing.assert_close(torch.from_numpy(row["mean"]), (posterior.mean[0] - SHIFT) * SCALE,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(row["logvar"]), posterior.logvar[0] + 2 * math.log(SCALE),
                                   rtol=1e-4, atol=1e-4)
        assert (row["source_height"], row["source_width"]) == (source.height, source.width)
        assert row["crop_box"] == pytest.approx(box, abs=1e-4) and row["latent_shape"] == [4, 8, 8]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["encoded"] == 6 and manifest["counts"]["errors"] == 0
    assert manifest["latents"]["normalization"] == {"kind": "scalar", "scaling_factor": SCALE, "shift_factor": SHIFT}
    assert manifest["shards"]["count"] == 2
    assert manifest["resolution"] == {"policy": "crop", "size": 32, "step": 4, "min_size": 16}

    main(["decode", "--input", str(out), "--output", str(tmp_path / "decoded"), "--progress", "false",
          "--device", "cpu"])
    for row in rows:
        decoded = np.asarray(Image.open(tmp_path / "decoded" / row["id"]))
        expected = codec.decode(torch.from_numpy(row["mean"])[None], output="numpy")[0]
        assert np.abs(decoded.astype(int) - expected).max() <= 1


def test_messy_folder_lists_bad_files_and_encodes_the_rest(tiny_vae, messy_folder, tmp_path):
    images = messy_folder
    out = tmp_path / "latents"
    summary = encode_dataset(tiny_vae, images, out, buckets=64, step=16, shard_size=5, batch_size=3,
                             num_workers=2, device="cpu", progress=False)
    assert summary.encoded == 9 and summary.errors == 4 and summary.manifest["complete"]
    errors = {Path(error["id"]).name: error["reason"] for error in errors_of(out)}
    assert set(errors) == BAD_FILES
    assert "zero-byte" in errors["zero.png"] and "tiny (8x8" in errors["tiny.png"]
    assert "not an image" in errors["notes.jpg"] and "truncated.jpg" in errors["truncated.jpg"]
    rows = {row["id"]: row for row in read_rows(out)}
    assert len(rows) == 9
    rotated = rows["odd/deeper/rotated.jpg"]  # 80x40 stored, EXIF-rotated to 40 wide, 80 tall
    assert (rotated["source_height"], rotated["source_width"]) == (80, 40)
    assert rotated["height"] > rotated["width"]
    for row in rows.values():
        assert row["latent_shape"] == [4, row["height"] // 4, row["width"] // 4]
        assert row["height"] * row["width"] <= 64 * 64 and row["height"] % 16 == 0 == row["width"] % 16
        aspect = row["source_width"] / row["source_height"]  # the bucket nearest the source's aspect ratio
        assert abs(math.log(row["width"] / row["height"]) - math.log(aspect)) < 0.5
        assert np.isfinite(row["mean"]).all()


def test_killed_run_resumes_with_every_image_exactly_once(tiny_vae, tmp_path):
    images = skimage_photos(tmp_path / "images", 13, bad=1)
    # A named pipe sorted into shard 4 blocks whoever opens it: the run is stuck there, mid-flight, with
    # shards 0-3 committed (two workers, taken round robin), when it is killed.
    blocker = images / "part1" / "photo08b.png"
    os.mkfifo(blocker)
    out = tmp_path / "latents"
    command = [sys.executable, "-m", "vaegan.cli", "encode", "--model", str(tiny_vae), "--input", str(images),
               "--output", str(out), "--crop", "32", "--shard_size", "2", "--batch_size", "1",
               "--num_workers", "2", "--device", "cpu", "--progress", "false"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / ".progress").glob("shard-*.json"))) < 4:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the encoding never reached the blocking file"
            time.sleep(0.1)
        time.sleep(0.5)  # let it settle into the blocked read
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # kill -9 the run and its data workers
        process.wait()
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    done_before = len(list(out.glob("train-*.parquet")))
    assert 0 < done_before < 8

    blocker.unlink()
    Image.fromarray(skimage.data.camera()[:48, :48]).save(blocker, format="PNG")
    summary = encode_dataset(tiny_vae, images, out, crop=32, shard_size=2, batch_size=1, num_workers=0,
                             device="cpu", progress=False)
    assert summary.skipped >= 8 and summary.manifest["complete"]
    ids = Counter(row["id"] for row in read_rows(out))
    good = {p.relative_to(images).as_posix() for p in images.rglob("*.png")}
    assert len(good) == 14 and ids == Counter(good)  # each good image once, none lost
    assert [error["id"] for error in errors_of(out)] == ["broken0.jpg"]
    assert not list(out.glob(".*.tmp")) and not list((out / ".progress").glob(".*.tmp"))


def test_every_moment_of_a_kill_leaves_each_image_once_and_nothing_uncommitted_readable(tiny_vae, tmp_path):
    images = skimage_photos(tmp_path / "images", 6)
    out = tmp_path / "latents"
    encode_dataset(tiny_vae, images, out, crop=32, shard_size=2, num_workers=0, device="cpu", progress=False)
    everything = Counter(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    # What kills at each step of the commit leave (vaegan.latents.shards):
    #   shard 0: staged, not committed (killed before its record): its file must count for nothing;
    #   shard 1: committed, not published (killed between record and publish);
    #   shard 2: a half-written staged file of a run killed while writing it.
    (out / ".progress" / "shard-000000.json").unlink()
    os.replace(out / "train-000000.parquet", out / ".staging" / "train-000000.parquet.aaaa.tmp")
    record = json.loads((out / ".progress" / "shard-000001.json").read_text())
    os.replace(out / "train-000001.parquet", out / record["staged"])
    (out / ".staging" / "train-000002.parquet.bbbb.tmp").write_bytes(b"PAR1 half a shard")

    # Nothing uncommitted is readable: `datasets` sees the published shard only, LatentDataset the committed ones.
    plain = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert Counter(plain["id"]) == Counter(row["id"] for row in read_rows(out)) and len(plain) == 2
    assert len(vaegan.LatentDataset(out)) == 4

    summary = encode_dataset(tiny_vae, images, out, crop=32, shard_size=2, num_workers=0, device="cpu",
                             progress=False)
    assert summary.encoded == 2 and summary.skipped == 4 and summary.manifest["complete"]
    assert Counter(row["id"] for row in read_rows(out)) == everything
    assert Counter(vaegan.LatentDataset(out).ids) == everything
    assert not list((out / ".staging").iterdir()) and not list(out.glob(".*.tmp"))


def test_two_processes_encode_every_image_once(tiny_vae, tmp_path):
    images = skimage_photos(tmp_path / "images", 9, bad=2)
    out = tmp_path / "latents"
    summary = encode_dataset(tiny_vae, images, out, crop=32, shard_size=2, batch_size=2, num_workers=1,
                             num_processes=2, device="cpu", progress=False)
    assert [rank.rank for rank in summary.ranks] == [0, 1]
    assert all(rank.encoded > 0 for rank in summary.ranks)
    assert summary.encoded == 9 and summary.errors == 2 and summary.manifest["complete"]
    ids = Counter(row["id"] for row in read_rows(out))
    assert ids == Counter(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    assert sorted(error["id"] for error in errors_of(out)) == ["broken0.jpg", "broken1.jpg"]


def test_torchrun_ranks_share_shards_and_the_last_writes_the_manifest(tiny_vae, tmp_path, monkeypatch):
    images = skimage_photos(tmp_path / "images", 5)
    out = tmp_path / "latents"
    monkeypatch.setenv("WORLD_SIZE", "2")
    results = []
    for rank in (1, 0):  # one after the other: rank 1 finds rank 0's shards missing, rank 0 completes
        monkeypatch.setenv("RANK", str(rank))
        results.append(encode_dataset(tiny_vae, images, out, crop=32, shard_size=2, num_workers=0, device="cpu",
                                      progress=False))
    assert results[0].manifest is None and results[1].manifest["complete"]
    assert results[0].ranks[0].shards == 1 and results[1].ranks[0].shards == 2  # shards 1 | 0, 2
    assert sorted(row["id"] for row in read_rows(out)) == sorted(
        p.relative_to(images).as_posix() for p in images.rglob("*.png"))


def test_a_rerun_with_other_settings_or_a_changed_folder_is_refused(tiny_vae, tmp_path):
    images = skimage_photos(tmp_path / "images", 3)
    out = tmp_path / "latents"
    encode_dataset(tiny_vae, images, out, crop=32, num_workers=0, device="cpu", progress=False)
    again = encode_dataset(tiny_vae, images, out, crop=32, num_workers=0, device="cpu", progress=False)
    assert again.encoded == 0 and again.skipped == 3
    with pytest.raises(ValueError, match="resolution"):
        encode_dataset(tiny_vae, images, out, crop=64, num_workers=0, device="cpu", progress=False)
    Image.new("RGB", (48, 48)).save(images / "part0" / "added.png")
    with pytest.raises(ValueError, match="source"):
        encode_dataset(tiny_vae, images, out, crop=32, num_workers=0, device="cpu", progress=False)
    with pytest.raises(ValueError, match="not empty"):  # e.g. the image folder itself, given by mistake
        encode_dataset(tiny_vae, images, images / "part1", crop=32, num_workers=0, device="cpu", progress=False)


def test_max_side_keeps_images_whole_up_to_the_cap(tiny_vae, tmp_path):
    images = skimage_photos(tmp_path / "images", 4)
    encode_dataset(tiny_vae, images, tmp_path / "latents", max_side=48, step=8, num_workers=0, device="cpu",
                   progress=False)
    for row in read_rows(tmp_path / "latents"):
        source_long = max(row["source_height"], row["source_width"])
        assert max(row["height"], row["width"]) <= 48 and row["height"] % 8 == 0 == row["width"] % 8
        scale = min(1, 48 / source_long)  # downscaled to the cap, then at most 7 px cut from each side
        assert -1 < row["source_height"] * scale - row["height"] < 8  # -1: the resize rounds
        assert -1 < row["source_width"] * scale - row["width"] < 8


def test_latents_that_overflow_fp16_are_errors_not_infinities(tiny_vae, tmp_path):
    images = skimage_photos(tmp_path / "images", 2)
    summary = encode_dataset(tiny_vae, images, tmp_path / "latents", crop=32, scaling_factor=1e6, num_workers=0,
                             device="cpu", progress=False)
    assert summary.encoded == 0 and summary.errors == 2
    assert all("not finite in fp16" in error["reason"] for error in errors_of(tmp_path / "latents"))


# --- datasets sources and readers ------------------------------------------------------------------------------


@pytest.fixture
def saved_dataset(tmp_path: Path) -> Path:
    """Five photos (one CMYK) with names, and one corrupt row, as a `save_to_disk` dataset."""
    photos = [Image.fromarray(skimage.data.astronaut()[i * 40:i * 40 + 48, :64]) for i in range(4)]
    photos.append(Image.fromarray(skimage.data.rocket()[:48, :80]).convert("CMYK"))
    rows = photos + [{"bytes": b"\xff\xd8 not a whole jpeg", "path": None}]
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    path = tmp_path / "saved"
    names = [f"row-{i}" for i in range(len(rows))]
    datasets.Dataset.from_dict({"image": rows, "name": names}, features=features).save_to_disk(str(path))
    return path


def test_datasets_source_map_style_and_streamed_give_the_same_latents(tiny_vae, saved_dataset, tmp_path, hf_cache):
    indexed, streamed = tmp_path / "indexed", tmp_path / "streamed"
    encode_dataset(tiny_vae, saved_dataset, indexed, crop=32, shard_size=4, num_workers=0, device="cpu",
                   progress=False)
    encode_dataset(tiny_vae, saved_dataset, streamed, crop=32, streaming=True, id_column="name", num_workers=2,
                   device="cpu", progress=False)
    by_index = {int(row["id"]): row for row in read_rows(indexed)}
    by_name = {row["id"]: row for row in read_rows(streamed)}
    assert sorted(by_index) == [0, 1, 2, 3, 4] and sorted(by_name) == [f"row-{i}" for i in range(5)]
    for i in range(5):
        np.testing.assert_allclose(by_index[i]["mean"], by_name[f"row-{i}"]["mean"], atol=2e-3)
    assert [error["index"] for error in errors_of(indexed)] == [5]
    assert [error["id"] for error in errors_of(streamed)] == ["row-5"]


def test_webdataset_shards_stream_with_their_keys_as_ids(tiny_vae, tmp_path, hf_cache):
    shards = tmp_path / "tars"
    shards.mkdir()
    for number in range(2):
        with tarfile.open(shards / f"data-{number:05d}.tar", "w") as tar:
            for i in range(3):
                encoded = io.BytesIO()
                Image.fromarray(skimage.data.astronaut()[40 * i:40 * i + 48, 64 * number:64 * number + 64]).save(
                    encoded, "JPEG")
                members = {"jpg": b"garbage" if (number, i) == (1, 2) else encoded.getvalue(), "txt": b"a caption"}
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"sample{number}{i}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "latents"
    summary = encode_dataset(tiny_vae, f"webdataset:{shards}", out, crop=32, image_column="jpg",
                             id_column="__key__", streaming=True, num_workers=2, device="cpu", progress=False)
    assert summary.manifest["shards"]["count"] == 2 and summary.encoded == 5
    assert sorted(row["id"] for row in read_rows(out)) == ["sample00", "sample01", "sample02", "sample10", "sample11"]
    assert [(error["id"], error["shard"], error["index"]) for error in errors_of(out)] == [("sample12", 1, 2)]


def test_shards_load_with_plain_datasets(tiny_vae, tmp_path, hf_cache):
    images = skimage_photos(tmp_path / "images", 5, bad=1)
    out = tmp_path / "latents"
    encode_dataset(tiny_vae, images, out, buckets=48, step=16, latent_dtype="bf16", shard_size=3, num_workers=0,
                   device="cpu", progress=False)
    # A fresh interpreter that cannot import vaegan: the shards must stand on their own.
    script = f"""
import sys; sys.modules["vaegan"] = None
import datasets, json, numpy as np
datasets.config.HF_DATASETS_CACHE = {str(tmp_path / "cache2")!r}
table = datasets.load_dataset("parquet", data_dir={str(out)!r}, split="train").with_format("numpy")
rows = [{{"id": str(row["id"]), "shape": row["latent_shape"].tolist(), "mean":
         (row["mean"].astype(np.uint32) << 16).view(np.float32).tolist()}} for row in table]
print(json.dumps(rows))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env=os.environ | {"HF_HUB_OFFLINE": "1"})
    plain = {row["id"]: row for row in json.loads(result.stdout.splitlines()[-1])}
    ours = {row["id"]: row for row in read_rows(out)}
    assert sorted(plain) == sorted(ours) and len(plain) == 5
    for name, row in plain.items():
        assert row["shape"] == ours[name]["latent_shape"]
        np.testing.assert_array_equal(np.array(row["mean"], np.float32), ours[name]["mean"])


def test_max_images_encodes_the_first_images_and_a_rerun_must_agree(tiny_vae, tmp_path):
    images = skimage_photos(tmp_path / "images", 5)
    out = tmp_path / "latents"
    summary = encode_dataset(tiny_vae, images, out, crop=32, max_images=3, shard_size=2, num_workers=0,
                             device="cpu", progress=False)
    assert summary.encoded == 3 and sorted(row["index"] for row in read_rows(out)) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"source.items: 3 -> 4"):  # the old and new values, not just the key
        encode_dataset(tiny_vae, images, out, crop=32, max_images=4, shard_size=2, num_workers=0, device="cpu",
                       progress=False)
