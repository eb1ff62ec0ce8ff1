"""JPEG decoding on the encoding device (`encode --decode_jpeg device`): the same pixels and latents as PIL in the
workers, per-image fallback to PIL, corrupt files recorded as errors exactly as before. On the CPU torchvision
decodes with libjpeg-turbo like PIL, so decoding is exact and only the resize may differ, by a level."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

import vaegan
from vaegan.images.buckets import ResolutionPolicy
from vaegan.images.crops import CropPlan
from vaegan.images.jpegs import JpegImage, decode_jpegs, jpeg_header
from vaegan.images.reading import load_image
from vaegan.latents.encode import encode_dataset
from vaegan.latents.sources import to_pixels

from conftest import read_rows

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def photo(assets) -> Path:
    return sorted((assets / "bsds500" / "train").glob("*.jpg"))[0]


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    data = io.BytesIO()
    image.save(data, "JPEG", quality=95, **options)
    return data.getvalue()


def test_every_exif_orientation_decodes_as_pil_turns_it(photo):
    stored = Image.open(photo).convert("RGB").crop((0, 0, 60, 40))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = jpeg_bytes(stored, exif=exif)
        width, height, read = jpeg_header(data)
        expected = load_image(data)
        assert (width, height, read) == (*expected.size, orientation)
        plan = CropPlan((width, height), (0, 0, width, height), (0, 0, width, height))
        [pixels] = decode_jpegs([JpegImage(data, "photo", orientation, plan)], torch.device("cpu"))
        assert torch.equal(pixels, to_pixels(expected)), orientation


@pytest.mark.parametrize("kind, size, step", [("crop", 96, 8), ("crop", 400, 8), ("buckets", 128, 32),
                                              ("max-side", 200, 8)])
def test_crops_on_tensors_match_pil_within_a_level(photo, kind, size, step):
    image = load_image(photo)
    plan = ResolutionPolicy.create(kind, size, factor=8, step=step).plan(*image.size)
    expected = to_pixels(plan.apply(image)).int()
    got = plan.apply_to_tensor(to_pixels(image)).int()
    difference = (got - expected).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3


def test_headers_send_only_plain_jpegs_to_the_device(photo):
    image = Image.open(photo).convert("RGB")
    assert jpeg_header(photo.read_bytes()) == (*image.size, 1)
    assert jpeg_header(jpeg_bytes(image.convert("L"))) == (*image.size, 1)
    assert jpeg_header(jpeg_bytes(image, progressive=True)) == (*image.size, 1)
    png = io.BytesIO()
    image.save(png, "PNG")
    for other in (jpeg_bytes(image.convert("CMYK")), png.getvalue(), photo.read_bytes()[:300], b"", b"\xff\xd8\xff"):
        assert jpeg_header(other) is None


@pytest.fixture(scope="module")
def mixed_folder(assets, photo, tmp_path_factory) -> Path:
    """Six BSDS photos (one of them gray, one progressive, two EXIF-turned), a PNG and a CMYK JPEG (read by PIL),
    and two corrupt JPEGs: one cut after its header, one cut inside it."""
    folder = tmp_path_factory.mktemp("mixed")
    photos = sorted((assets / "bsds500" / "train").glob("*.jpg"))[:8]
    for path in photos[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    image = Image.open(photos[3]).convert("RGB")
    (folder / "gray.jpg").write_bytes(jpeg_bytes(image.convert("L")))
    (folder / "progressive.jpg").write_bytes(jpeg_bytes(image, progressive=True))
    for orientation in (6, 3):
        exif = Image.Exif()
        exif[0x0112] = orientation
        turned = jpeg_bytes(Image.open(photos[4 + orientation % 2]), exif=exif)
        (folder / f"turned{orientation}.jpg").write_bytes(turned)
    Image.open(photos[6]).save(folder / "photo.png")
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes(Image.open(photos[7]).convert("CMYK")))
    whole = photo.read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (folder / "header.jpg").write_bytes(whole[:300])
    return folder


def encode_both(tiny_model: Path, folder: Path, tmp_path: Path, **options):
    settings = dict(buckets=128, step=32, batch_size=3, shard_size=6, latent_dtype="fp32", device="cpu",
                    progress=False) | options
    workers = encode_dataset(tiny_model, folder, tmp_path / "workers", **settings)
    device = encode_dataset(tiny_model, folder, tmp_path / "device", decode_jpeg="device", **settings)
    return workers, device


def assert_same_shards(tmp_path: Path, tolerance: float) -> None:
    workers = {row["id"]: row for row in read_rows(tmp_path / "workers")}
    device = {row["id"]: row for row in read_rows(tmp_path / "device")}
    assert sorted(workers) == sorted(device) and len(workers) == 9
    for name, row in workers.items():
        other = device[name]
        for key in ("height", "width", "source_height", "source_width", "latent_shape"):
            assert row[key] == other[key], (name, key)
        assert row["crop_box"] == pytest.approx(other["crop_box"])
        for key in ("mean", "logvar"):
            assert np.abs(row[key] - other[key]).max() <= tolerance, (name, key)
    errors = [(tmp_path / run / "errors.jsonl").read_text() for run in ("workers", "device")]
    assert errors[0] == errors[1]
    reasons = {Path(error["id"]).name: error["reason"] for error in map(json.loads, errors[0].splitlines())}
    assert set(reasons) == {"truncated.jpg", "header.jpg"} and "truncated" in reasons["truncated.jpg"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), tmp_path_factory.mktemp("vae") / "mini")


# Measured on the CPU: up to 6e-3 between the two paths' fp32 posterior means of the random tiny VAE, over 24 BSDS
# photos at crop 256 and buckets 256 (means up to 2.5; pixels differ by one level on a few in ten thousand, where
# the resize rounds differently).
LATENT_TOLERANCE = 1e-2


def test_device_decoding_gives_the_shards_of_worker_decoding(tiny_model, mixed_folder, tmp_path):
    workers, device = encode_both(tiny_model, mixed_folder, tmp_path, num_workers=1)
    assert workers.device_decoded == 0 and workers.encoded == device.encoded == 9
    # The PNG and the CMYK JPEG are read by PIL in the workers, the truncated JPEG by PIL after the device refused
    # it, the one cut inside its header by PIL in the workers (both errors).
    assert device.device_decoded == 7 and workers.errors == device.errors == 2
    assert_same_shards(tmp_path, LATENT_TOLERANCE)


def test_jpegs_the_device_refuses_are_read_by_pil_one_by_one(tiny_model, mixed_folder, tmp_path, monkeypatch):
    """nvjpeg refuses some JPEGs that PIL reads (which ones depends on its version); here the progressive one."""
    decode_jpeg = torchvision.io.decode_jpeg

    def refusing_progressive(data, **options):
        for one in data if isinstance(data, list) else [data]:
            if b"\xff\xc2" in bytes(one[:2000].numpy()):  # SOF2: progressive
                raise RuntimeError("unsupported JPEG")
        return decode_jpeg(data, **options)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing_progressive)
    _, device = encode_both(tiny_model, mixed_folder, tmp_path, num_workers=0)
    assert device.device_decoded == 6 and device.encoded == 9
    assert_same_shards(tmp_path, LATENT_TOLERANCE)
