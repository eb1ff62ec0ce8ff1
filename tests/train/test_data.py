"""Image decoding, the crop protocols and the data module: awkward files load right, bad ones are skipped."""

import io
import warnings
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms

from vaegan.images.crops import random_crop, resize_center_crop
from vaegan.images.readers import DEMO_TRAIN_PHOTOS, DEMO_VAL_PHOTOS
from vaegan.images.reading import ImageError, load_image, to_tensor
from vaegan.train.data import ImageDataModule

from conftest import BAD_FILES, rotated_jpeg, sixteen_bit_ramp, write_png16_rgb

RESOLUTION = 64  # small crops keep every test well under a second of decoding


# --- load_image -------------------------------------------------------------------------------------------


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(sixteen_bit_ramp()).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (48, 72, 3)
    assert pixels[0, :3, 0].tolist() == [0, 128, 255]  # 32768 / 257 = 127.5 -> 128
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_sixteen_bit_big_endian_and_rgb(tmp_path):
    ramp = sixteen_bit_ramp()
    big_endian = Image.frombytes("I;16B", (72, 48), ramp.astype(">u2").tobytes())
    assert np.asarray(load_image(big_endian))[0, :3, 1].tolist() == [0, 128, 255]
    rgb = np.stack([ramp, np.full_like(ramp, 32768), np.full_like(ramp, 65535)], axis=-1)
    write_png16_rgb(tmp_path / "rgb16.png", rgb)
    pixels = np.asarray(load_image(tmp_path / "rgb16.png"))
    assert pixels[0, :3, 0].tolist() == [0, 128, 255]
    assert pixels[0, 0].tolist() == [0, 128, 255]


def test_transparency_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent becomes white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black becomes mid grey
    pixels = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert pixels[0, 1].tolist() == [255, 255, 255]
    assert np.allclose(pixels[1, 0], 127, atol=1)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    assert np.asarray(load_image(palette)).tolist() == [[[255, 255, 255], [0, 0, 255]]]


def test_cmyk_grayscale_and_bytes_become_rgb():
    encoded = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(encoded, "JPEG")  # pure red in CMYK
    red = load_image(encoded.getvalue())
    assert red.mode == "RGB" and np.allclose(np.asarray(red)[8, 8], (255, 0, 0), atol=3)
    gray = load_image({"bytes": _png_bytes(Image.new("L", (4, 4), 77)), "path": None})
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [77, 77, 77]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    rotated_jpeg(tmp_path / "rotated.jpg")
    image = load_image(tmp_path / "rotated.jpg")
    assert image.size == (40, 80)  # the wide stored image is tall once turned
    pixels = np.asarray(image).astype(int)
    # Turning 90° clockwise moves the stored top-left corner to the top-right.
    assert np.allclose(pixels[2:10, -10:-2].mean(axis=(0, 1)), (255, 0, 0), atol=20)
    assert np.allclose(pixels[2:10, 2:10].mean(axis=(0, 1)), 128, atol=20)


def test_bad_files_raise_image_error_naming_the_file(messy_folder):
    for name in ("odd/zero.png", "photos/notes.jpg", "odd/deeper/truncated.jpg"):
        with pytest.raises(ImageError, match=Path(name).name):
            load_image(messy_folder / name)
    with pytest.raises(ValueError, match="zero bytes"):  # ImageError is a ValueError
        load_image(b"")


def test_to_tensor_range():
    tensor = to_tensor(Image.fromarray(np.array([[[0, 255, 0]]], np.uint8)))
    assert tensor.shape == (3, 1, 1) and tensor.dtype == torch.float32
    assert tensor.flatten().tolist() == [-1.0, 1.0, -1.0]


# --- crops ----------------------------------------------------------------------------------------------


def test_center_crop_matches_torchvision():
    image = Image.fromarray(skimage.data.coffee())  # 600x400
    crop, box = resize_center_crop(image, RESOLUTION)
    reference = transforms.CenterCrop(RESOLUTION)(
        transforms.Resize(RESOLUTION, interpolation=transforms.InterpolationMode.BICUBIC)(image)
    )
    assert np.array_equal(np.asarray(crop), np.asarray(reference))
    assert box[1] == 0 and box[3] == pytest.approx(400)  # the full height, centred horizontally
    assert box[0] + box[2] == pytest.approx(600, abs=10)


def test_random_crop_upscales_small_images_and_is_seeded():
    small = Image.fromarray(skimage.data.astronaut()[:40, :50])
    crop, box, _ = random_crop(small, RESOLUTION, generator=torch.Generator().manual_seed(0))
    assert crop.size == (RESOLUTION, RESOLUTION)
    assert 0 <= box[0] < box[2] <= 50 and 0 <= box[1] < box[3] <= 40
    large = Image.fromarray(skimage.data.astronaut())
    first = random_crop(large, RESOLUTION, generator=torch.Generator().manual_seed(3))
    second = random_crop(large, RESOLUTION, generator=torch.Generator().manual_seed(3))
    assert first[1:] == second[1:] and first[1][2] - first[1][0] == RESOLUTION  # native resolution crop
    flips = {random_crop(large, RESOLUTION, generator=torch.Generator().manual_seed(s))[2] for s in range(20)}
    assert flips == {True, False}
    assert not any(random_crop(large, RESOLUTION, flip=False)[2] for _ in range(10))


# --- the data module --------------------------------------------------------------------------------------


def folder_module(source: str, **overrides) -> ImageDataModule:
    settings = dict(resolution=RESOLUTION, batch_size=3, num_workers=0, min_size=32, val_count=2)
    module = ImageDataModule(source=source, **(settings | overrides))
    module.setup("fit")
    return module


def full_pass(module: ImageDataModule, loader) -> list[torch.Tensor]:
    """Iterate as a Trainer would: every batch goes through the data module's batch hook."""
    return [module.on_before_batch_transfer(batch, 0) for batch in loader]


def test_folder_pass_skips_and_counts_bad_files(messy_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = folder_module(str(messy_folder))
        batches = full_pass(module, module.train_dataloader()) + full_pass(module, module.val_dataloader())
        full_pass(module, module.train_dataloader())  # a second epoch warns about nothing new
    assert {Path(name).name for name in module.skipped} == BAD_FILES
    assert module.num_skipped == 4
    assert "tiny (8x8" in module.skipped[str(messy_folder / "photos" / "tiny.png")]
    assert len([w for w in caught if "skipped image" in str(w.message)]) == 4  # once per file
    readable = 13 - 3  # thirteen image files, three rejected from their headers alone
    assert len(module.train_dataset) + len(module.val_dataset) == readable
    assert sum(len(batch) for batch in batches) == readable  # the truncated file is replaced, not dropped
    for batch in batches:
        assert batch.shape[1:] == (3, RESOLUTION, RESOLUTION) and batch.dtype == torch.float32
        assert batch.min() >= -1.0 and batch.max() <= 1.0


def test_validation_is_deterministic_and_held_out(messy_folder):
    module = folder_module(str(messy_folder), val_count=3)
    first = torch.cat(full_pass(module, module.val_dataloader()))
    second = torch.cat(full_pass(module, module.val_dataloader()))
    assert first.shape[0] == 3 and torch.equal(first, second)
    train_names = {module.train_dataset.reader.name(i) for i in range(len(module.train_dataset))}
    val_names = {module.val_dataset.reader.name(i) for i in range(len(module.val_dataset))}
    assert not train_names & val_names
    again = folder_module(str(messy_folder), val_count=3)  # the same seed holds out the same images
    assert {again.val_dataset.reader.name(i) for i in range(3)} == val_names


def test_worker_processes_report_skips(messy_folder):
    module = folder_module(str(messy_folder), num_workers=2, val_count=1)
    loader = module.train_dataloader()
    assert loader.persistent_workers
    for _ in range(2):
        batches = full_pass(module, loader)
        assert all(batch.shape[1:] == (3, RESOLUTION, RESOLUTION) for batch in batches)
    assert module.num_skipped >= 3  # the truncated file may be the one held out for validation


class MeanModel(L.LightningModule):
    """The smallest trainable module: checks what the data module hands a LightningModule."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, torch.Tensor) and batch.shape[1:] == (3, RESOLUTION, RESOLUTION)
        return (batch * self.scale).square().mean()

    def validation_step(self, batch, batch_idx):
        assert isinstance(batch, torch.Tensor)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_receives_image_tensors(messy_folder, tmp_path):
    module = ImageDataModule(
        str(messy_folder), resolution=RESOLUTION, batch_size=4, num_workers=0, min_size=32, val_count=2
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(MeanModel(), datamodule=module)
    assert {Path(name).name for name in module.skipped} == BAD_FILES


def test_default_demo_source_works_offline():
    module = ImageDataModule(resolution=RESOLUTION, batch_size=8, num_workers=0)
    module.setup("fit")
    assert len(module.train_dataset) == 32 * len(DEMO_TRAIN_PHOTOS)
    assert len(module.val_dataset) == len(DEMO_VAL_PHOTOS) == 2
    # Validation photos are never cropped for training.
    assert not set(DEMO_TRAIN_PHOTOS) & set(DEMO_VAL_PHOTOS)
    batch = next(iter(module.train_dataloader()))["image"]
    assert batch.shape == (8, 3, RESOLUTION, RESOLUTION) and -1 <= batch.min() < batch.max() <= 1
    val = torch.cat(full_pass(module, module.val_dataloader()))
    assert torch.equal(val, torch.cat(full_pass(module, module.val_dataloader())))


def test_bsds500_folder_loads(assets):
    module = folder_module(str(assets / "bsds500" / "test"), val_count=4, batch_size=4)
    assert len(module.train_dataset) == 196 and module.num_skipped == 0
    val = module.on_before_batch_transfer(next(iter(module.val_dataloader())), 0)
    assert val.shape == (4, 3, RESOLUTION, RESOLUTION)


# --- `datasets` sources -----------------------------------------------------------------------------------


@pytest.fixture
def saved_dataset(tmp_path: Path) -> Path:
    """A `save_to_disk` dataset of five photos and one corrupt row."""
    photos = [
        Image.fromarray(getattr(skimage.data, name)()).reduce(2)
        for name in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    photos.append(Image.fromarray(skimage.data.camera()))
    rows = photos + [{"bytes": b"\xff\xd8 definitely not a whole jpeg", "path": None}]
    features = datasets.Features({"image": datasets.Image()})
    path = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": rows}, features=features).save_to_disk(str(path))
    return path


def test_saved_dataset_source(saved_dataset):
    module = folder_module(str(saved_dataset), val_count=1)
    batches = full_pass(module, module.train_dataloader()) + full_pass(module, module.val_dataloader())
    assert sum(len(batch) for batch in batches) == 6  # the corrupt row is replaced by its neighbour
    assert module.num_skipped == 1 and "saved[" in next(iter(module.skipped))


def test_imagefolder_builder_source(messy_folder, hf_cache):
    module = folder_module(f"imagefolder:{messy_folder}", val_count=2)
    batches = full_pass(module, module.train_dataloader()) + full_pass(module, module.val_dataloader())
    assert sum(len(batch) for batch in batches) == len(module.train_dataset) + 2
    assert all(batch.min() >= -1 and batch.max() <= 1 for batch in batches)
    assert {Path(name).name for name in module.skipped} <= BAD_FILES and module.num_skipped >= 1


@pytest.mark.parametrize("kind", ["imagefolder", "saved"])
def test_streaming_yields_batches(kind, messy_folder, saved_dataset, hf_cache):
    source = f"imagefolder:{messy_folder}" if kind == "imagefolder" else str(saved_dataset)
    module = folder_module(source, streaming=True, val_count=2)
    train = full_pass(module, module.train_dataloader())
    val = full_pass(module, module.val_dataloader())
    assert sum(len(batch) for batch in val) == 2
    assert sum(len(batch) for batch in train) >= 3
    assert all(batch.shape[1:] == (3, RESOLUTION, RESOLUTION) for batch in train + val)
    assert module.num_skipped >= 1
    assert torch.equal(torch.cat(val), torch.cat(full_pass(module, module.val_dataloader())))


def test_streaming_a_plain_folder_is_refused(messy_folder):
    with pytest.raises(ValueError, match="imagefolder:"):
        ImageDataModule(str(messy_folder), streaming=True)
