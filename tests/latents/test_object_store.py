"""Encoding where the data lives: images read from and latents written to an S3-compatible server (moto, started
by the test on the loopback interface and reached through s3fs like a real bucket), exactly once across a
kill -9, and read back by `LatentDataset` and plain `datasets` from the URL."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import datasets
import fsspec
import numpy as np
import torch

import vaegan
from vaegan.cli import main
from vaegan.latents.encode import encode_dataset

from conftest import skimage_photos


def upload(folder: Path, url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{root}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def test_a_bucket_in_a_bucket_out_gives_the_latents_of_a_local_run(mini_vae, s3, tmp_path, hf_cache):
    images = skimage_photos(tmp_path / "images", 7, bad=1)
    encode_dataset(mini_vae, images, tmp_path / "local", crop=32, shard_size=3, num_workers=0, device="cpu",
                   progress=False)
    upload(images, f"{s3}/images")
    summary = encode_dataset(mini_vae, f"{s3}/images", f"{s3}/latents", crop=32, shard_size=3, num_workers=1,
                             device="cpu", progress=False)
    assert summary.manifest["complete"] and summary.encoded == 7 and summary.errors == 1

    fs = fsspec.filesystem("s3")
    assert sorted(path.rsplit("/", 1)[-1] for path in fs.ls("bucket/latents")) == [
        ".progress", "errors.jsonl", "manifest.json", "train-000000.parquet", "train-000001.parquet",
        "train-000002.parquet"]
    assert not fs.exists("bucket/latents/.staging") or not fs.ls("bucket/latents/.staging")
    assert [json.loads(line)["id"] for line in fs.cat_file("bucket/latents/errors.jsonl").splitlines()] == [
        "broken0.jpg"]

    local, remote = vaegan.LatentDataset(tmp_path / "local"), vaegan.LatentDataset(f"{s3}/latents")
    assert remote.ids == local.ids and len(remote) == 7
    for index in range(len(remote)):
        for name, value in local.stored(index).items():
            torch.testing.assert_close(remote.stored(index)[name], value, rtol=0, atol=0)
    plain = datasets.load_dataset("parquet", data_files=f"{s3}/latents/train-*.parquet", split="train")
    assert sorted(plain["id"]) == sorted(local.ids)
    # `vaegan decode` reads the bucket too.
    main(["decode", "--input", f"{s3}/latents", "--output", str(tmp_path / "decoded"), "--model", str(mini_vae),
          "--device", "cpu", "--progress", "false"])
    assert sorted(path.relative_to(tmp_path / "decoded").with_suffix("").as_posix()
                  for path in (tmp_path / "decoded").rglob("*.png")) == sorted(
        name.removesuffix(".png") for name in local.ids)


def test_a_run_killed_while_writing_to_a_bucket_resumes_with_every_image_once(mini_vae, s3, tmp_path, hf_cache):
    images = skimage_photos(tmp_path / "images", 11)
    # A named pipe sorted into the last shard blocks the worker that opens it: the run is stuck there with
    # the earlier shards committed when it is killed.
    blocker = images / "part1" / "zz_blocker.png"
    os.mkfifo(blocker)
    out = f"{s3}/latents"
    command = [sys.executable, "-m", "vaegan.cli", "encode", "--model", str(mini_vae), "--input", str(images),
               "--output", out, "--crop", "32", "--shard_size", "3", "--batch_size", "1", "--num_workers", "1",
               "--device", "cpu", "--progress", "false"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fs = fsspec.filesystem("s3")
    try:
        deadline = time.monotonic() + 120
        while len(fs.glob("bucket/latents/.progress/shard-*.json", refresh=True)) < 3:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the encoding never reached the blocking file"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    fs.invalidate_cache()
    assert not json.loads(fs.cat_file("bucket/latents/manifest.json"))["complete"]
    before = vaegan.LatentDataset(out)
    assert 0 < len(before) < 12 and len(set(before.ids)) == len(before.ids)

    blocker.unlink()
    skimage_photos(tmp_path / "spare", 1)
    os.replace(next((tmp_path / "spare").rglob("*.png")), blocker)
    summary = encode_dataset(mini_vae, images, out, crop=32, shard_size=3, batch_size=1, num_workers=0, device="cpu",
                             progress=False)
    assert summary.manifest["complete"] and summary.skipped == len(before)
    everything = Counter(path.relative_to(images).as_posix() for path in images.rglob("*.png"))
    after = vaegan.LatentDataset(out)
    assert Counter(after.ids) == everything
    fs.invalidate_cache()  # `datasets` lists the bucket through this process's (shared, caching) s3fs instance
    plain = datasets.load_dataset("parquet", data_files=f"{out}/train-*.parquet", split="train")
    assert Counter(plain["id"]) == everything
    fs.invalidate_cache()
    assert not fs.glob("bucket/latents/.staging/*")
    local = tmp_path / "local"
    encode_dataset(mini_vae, images, local, crop=32, shard_size=3, batch_size=1, num_workers=0, device="cpu",
                   progress=False)
    expected = vaegan.LatentDataset(local)
    for index in range(len(after)):
        same = expected.ids.index(after.ids[index])
        np.testing.assert_array_equal(after.stored(index)["mean"], expected.stored(same)["mean"])


def test_file_urls_are_local_folders(mini_vae, tmp_path):
    images = skimage_photos(tmp_path / "images", 3)
    summary = encode_dataset(mini_vae, f"file://{images}", f"file://{tmp_path}/latents", crop=32, num_workers=0,
                             device="cpu", progress=False)
    assert summary.manifest["complete"] and (tmp_path / "latents" / "train-000000.parquet").is_file()
    assert sorted(vaegan.LatentDataset(f"file://{tmp_path}/latents").ids) == sorted(
        path.relative_to(images).as_posix() for path in images.rglob("*.png"))
