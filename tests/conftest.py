"""Shared fixtures and helpers: the offline assets beside the checkout, folders of real and awkward images,
and reading latent shards back."""

import io
import json
import os
import shutil
import struct
import urllib.request
import zlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
import torch
from PIL import Image

import vaegan
from vaegan.latents.quantization import column_maps
from vaegan.latents.shards import decode_values, unnested

SHARED_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
# The four files of `make_messy_folder` that no reader can use.
BAD_FILES = {"zero.png", "notes.jpg", "tiny.png", "truncated.jpg"}


@pytest.fixture(scope="session")
def assets() -> Path:
    """`../shared/assets` (LPIPS backbones, Kodak, BSDS500); tests needing it skip when it is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"offline assets not found at {SHARED_ASSETS} (CI always has them)")
    return SHARED_ASSETS


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach a hub; pretrained backbones come from the shared folder when it exists."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("VAEGAN_OFFLINE", "1")  # torchvision weights from its cache only, never downloaded
    if "VAEGAN_WEIGHTS_DIR" not in os.environ and (SHARED_ASSETS / "lpips").is_dir():
        monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(SHARED_ASSETS / "lpips"))
    elif "VAEGAN_WEIGHTS_DIR" in os.environ:  # the README's relative path, for commands run in other folders
        monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(Path(os.environ["VAEGAN_WEIGHTS_DIR"]).resolve()))
    torch.manual_seed(0)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Builders (imagefolder) write their cache, and remote data files are downloaded, under the test's tmp
    folder, not the user's home (where a file of an earlier run at the same URL would be taken for this one's)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", tmp_path / "hf-cache" / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", tmp_path / "hf-cache" / "downloads" / "extracted")


@pytest.fixture(scope="session")
def mini_vae(tmp_path_factory) -> Path:
    """A `mini` VAE with random weights (seed 0), saved as a diffusers folder: what encoding tests encode with."""
    torch.manual_seed(0)
    return vaegan.save(vaegan.AutoencoderKL(vaegan.preset("mini")), tmp_path_factory.mktemp("mini-vae") / "vae")


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """An S3-compatible server (moto) started for this test on the loopback interface, with one bucket; s3fs,
    boto and subprocesses reach it through the usual AWS_* environment, as they would a real one. Yields the
    bucket's URL, "s3://bucket"."""
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets per Python process, not per server: start from none.
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"))
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):  # nothing from the machine's ~/.aws
        monkeypatch.setenv(name, str(tmp_path / "no-aws-config"))
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bucket")
    yield "s3://bucket"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    return make_messy_folder(tmp_path / "images")


def make_messy_folder(root: Path) -> Path:
    """Nested folders of good photos, awkward-but-valid encodings and four bad files (`BAD_FILES`)."""
    (root / "photos").mkdir(parents=True)
    (root / "odd" / "deeper").mkdir(parents=True)
    Image.fromarray(skimage.data.astronaut()[:200, :300]).save(root / "photos" / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()).save(root / "photos" / "chelsea.jpg", quality=90)
    Image.fromarray(skimage.data.coffee()).save(root / "photos" / "coffee.webp")
    Image.fromarray(skimage.data.rocket()).convert("CMYK").save(root / "odd" / "cmyk.jpg")
    Image.fromarray(sixteen_bit_ramp()).save(root / "odd" / "gray16.png")
    write_png16_rgb(root / "odd" / "deeper" / "rgb16.png", np.stack([sixteen_bit_ramp()] * 3, axis=-1))
    Image.fromarray(skimage.data.astronaut()[:100, :100]).convert("RGBA").save(root / "odd" / "rgba.png")
    Image.fromarray(skimage.data.camera()).save(root / "odd" / "gray.png")
    rotated_jpeg(root / "odd" / "deeper" / "rotated.jpg")
    # The bad ones: each must be skipped and counted, none may stop a pass.
    jpeg = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(jpeg, "JPEG")
    (root / "odd" / "deeper" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3])
    (root / "odd" / "zero.png").write_bytes(b"")
    (root / "photos" / "notes.jpg").write_text("not an image, despite the name\n")
    Image.new("RGB", (8, 8), (10, 200, 30)).save(root / "photos" / "tiny.png")
    (root / "photos" / "README.txt").write_text("ignored: not an image extension\n")
    return root


def write_png16_rgb(path: Path, array: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand: PIL can read these but not write them."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bit, colour type 2 (RGB)
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)


def sixteen_bit_ramp(height: int = 48, width: int = 72) -> np.ndarray:
    """A (H, W) uint16 image whose first row starts 0, 32768, 65535."""
    ramp = np.tile(np.linspace(0, 65535, width, dtype=np.uint16), (height, 1))
    ramp[0, :3] = (0, 32768, 65535)
    return ramp


def rotated_jpeg(path: Path) -> None:
    """A wide 80x40 JPEG, red block in its stored top-left corner, tagged EXIF orientation 6 (turn 90° CW)."""
    array = np.full((40, 80, 3), 128, np.uint8)
    array[:12, :12] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(path, "JPEG", exif=exif, quality=95)


def skimage_photos(root: Path, count: int, bad: int = 0) -> Path:
    """`count` small crops of skimage photos in two subfolders, sizes varying, plus `bad` unreadable files."""
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    for i in range(count):
        height, width = 40 + 8 * (i % 4), 64 - 6 * (i % 3)
        array = photos[i % 4][5 * i:5 * i + height, 7 * i:7 * i + width]
        (root / f"part{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / f"part{i % 2}" / f"photo{i:02d}.png")
    for i in range(bad):
        (root / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def bsds_photos(assets: Path, tmp_path: Path, split: str, count: int, corrupt: bool = False) -> Path:
    """`count` BSDS500 photos of a split in tmp_path/split, plus a truncated JPEG with `corrupt`."""
    folder = tmp_path / split
    folder.mkdir()
    for photo in sorted((assets / "bsds500" / split).glob("*.jpg"))[:count]:
        shutil.copy(photo, folder)
    if corrupt:
        (folder / "corrupt.jpg").write_bytes((assets / "bsds500" / split / photo.name).read_bytes()[:300])
    return folder


def read_rows(folder: Path) -> list[dict]:
    """Every row of every shard, with latents as float32 arrays."""
    rows = []
    for path in sorted(folder.glob("train-*.parquet")):
        table = pq.read_table(path)
        metadata = json.loads(table.schema.metadata[b"vaegan"])
        maps = column_maps(metadata.get("quantization"))
        shapes = table.column("latent_shape").combine_chunks().flatten().to_numpy().reshape(-1, 3)
        tensors = {name: unnested(table.column(name), shapes) for name in ("mean", "logvar", "latent")
                   if name in table.column_names}
        for i, row in enumerate(table.drop([*tensors]).to_pylist()):
            rows.append(row | {name: decode_values(values[i], metadata["dtype"], maps.get(name))
                               for name, values in tensors.items()})
    return rows
