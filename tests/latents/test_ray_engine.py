"""`vaegan encode --engine ray`: a local Ray instance with two encoder actors encodes what the local engine does,
from tars in a bucket (moto on the loopback interface) into the bucket; kill -9 of an encoder actor's process
and then of the driver loses no image and duplicates none."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import vaegan
from vaegan.latents.encode import encode_dataset

from conftest import skimage_photos

pytest.importorskip("ray")
pytest.importorskip("s3fs")


def assert_same_latents(folder: str | Path, reference: Path) -> None:
    """The same ids once each, and latents within fp32 rounding of the reference's (the engines run convolutions
    on different thread counts, so the last bits may differ)."""
    got, expected = vaegan.LatentDataset(folder), vaegan.LatentDataset(reference)
    assert Counter(got.ids) == Counter(expected.ids) and len(set(got.ids)) == len(got.ids)
    for index, name in enumerate(got.ids):
        other = expected.ids.index(name)
        for column, value in expected.stored(other).items():
            torch.testing.assert_close(got.stored(index)[column], value, rtol=1e-5, atol=1e-5)


def test_ray_encodes_tars_in_a_bucket_as_the_local_engine_does(mini_vae, s3, tmp_path):
    import fsspec

    images = skimage_photos(tmp_path / "images", 8)
    fs = fsspec.filesystem("s3")
    import tarfile

    for number, part in enumerate(sorted((images).glob("part*"))):
        with tarfile.open(tmp_path / f"{number:03d}.tar", "w") as tar:
            for path in sorted(part.glob("*.png")):
                tar.add(path, arcname=f"{part.name}_{path.stem}.png")
        fs.pipe_file(f"bucket/tars/{number:03d}.tar", (tmp_path / f"{number:03d}.tar").read_bytes())
    source = f"{s3}/tars/{{000..001}}.tar"
    options = dict(crop=32, latent_dtype="fp32", batch_size=2, device="cpu", progress=False)
    encode_dataset(mini_vae, source, tmp_path / "local", num_workers=0, **options)
    summary = encode_dataset(mini_vae, source, f"{s3}/latents", engine="ray", num_processes=2, num_workers=2, **options)
    assert summary.manifest["complete"] and summary.encoded == 8 and summary.ranks[0].device == "ray: 2 CPU actors"
    assert_same_latents(f"{s3}/latents", tmp_path / "local")


def actor_processes() -> list[int]:
    """Pids of this machine's Ray encoder actors (their process titles name the actor class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"EncodeShards" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_killing_an_actor_then_the_driver_loses_and_duplicates_nothing(mini_vae, tmp_path):
    images = skimage_photos(tmp_path / "images", 14)
    out = tmp_path / "latents"
    command = [sys.executable, "-m", "vaegan.cli", "encode", "--model", str(mini_vae), "--input", str(images),
               "--output", str(out), "--crop", "32", "--latent_dtype", "fp32", "--shard_size", "1",
               "--batch_size", "1", "--engine", "ray", "--num_processes", "2", "--num_workers", "1",
               "--device", "cpu", "--progress", "false"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def committed() -> int:
        return len(list((out / ".progress").glob("shard-*.json")))

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 180
        while committed() < count:
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"stuck at {committed()} shards"
            time.sleep(0.05)

    try:
        wait_for(2)
        killed = actor_processes()[0]
        os.kill(killed, signal.SIGKILL)  # Ray restarts the actor and retries what it held
        before = committed()
        wait_for(before + 2)  # the run goes on without it
        assert killed not in actor_processes()
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver, and with it the Ray instance it started
        process.wait()
    done_before = committed()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and done_before < 15

    summary = encode_dataset(mini_vae, images, out, crop=32, latent_dtype="fp32", shard_size=1, batch_size=1,
                             engine="ray", num_processes=2, num_workers=1, device="cpu", progress=False)
    assert summary.manifest["complete"] and summary.skipped == done_before
    encode_dataset(mini_vae, images, tmp_path / "local", crop=32, latent_dtype="fp32", shard_size=1, batch_size=1,
                   num_workers=0, device="cpu", progress=False)
    assert_same_latents(out, tmp_path / "local")
    assert not list((out / ".staging").glob("*"))
