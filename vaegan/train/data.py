"""The training data module: datasets of crops over the image readers of `vaegan.images.readers`.

Bad files never stop a run. A folder is pre-scanned at setup (file headers only, cheap): zero-byte,
non-image and tiny files are dropped there. What only fails on a full decode (a truncated JPEG, a corrupt row
of a `datasets` source) is found at `__getitem__` time: the dataset falls back to the next index,
deterministically, and reports the skipped file inside the batch. Both kinds are collected by the data
module, which warns once per file (rank zero) and keeps them in `ImageDataModule.skipped`.

A resumed run reads exactly what the interrupted one would have read next. The training order is a
permutation per epoch seeded by (seed, epoch), each crop and flip is drawn with a seed derived from (seed,
epoch, sample), and the training loader's place in its epoch goes into every checkpoint (Lightning saves and
restores the state of a loader that has `state_dict`/`load_state_dict`). None of it depends on the data
workers, so their number can change between runs. Streamed sources are the exception: a resumed stream starts
its pass over, with crops drawn by the workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from vaegan.images.crops import check_size
from vaegan.images.readers import (
    DEMO_CROPS_PER_PHOTO,
    DEMO_TRAIN_PHOTOS,
    DEMO_VAL_PHOTOS,
    EvalCrop,
    ImageReader,
    ReaderSubset,
    Skip,
    TrainCrop,
    image_column_only,
    is_image_folder,
    load_demo_photos,
    load_hub_source,
    open_reader,
    row_name,
)
from vaegan.images.reading import ImageError, load_image
from vaegan.train.encoded import EncodedCrops, EncodedLatents, open_encoded, split_encoded
from vaegan.train.items import Sample, first_readable, held_out_split
from vaegan.utils.seeds import derived_seed, seeded_generator

# A stream has no length, so a fraction cannot be held out of it: this many leading examples are, by default.
STREAMING_HOLDOUT = 1000
# Shuffle buffer of a streamed training source: enough to mix neighbouring shards, small enough for RAM.
STREAMING_SHUFFLE_BUFFER = 1000


class ImageDataset(Dataset):
    """Map-style: item i is `{"image": (3, R, R) tensor, "skipped": [(name, reason), ...]}`.

    An unreadable or tiny image at i is replaced by the next readable index (i+1, i+2, ...), so a given index
    always yields the same image, and the replaced names travel with the item to the data module's count.
    `repeats` lists every image that many times per epoch (random crops make each repeat a new sample).
    Asked for a `Sample` rather than an index, the transform draws from a generator seeded by the sample's seed.
    """

    def __init__(
        self,
        reader: ImageReader,
        transform: Callable[[Image.Image, torch.Generator | None], torch.Tensor],
        min_size: int,
        repeats: int = 1,
    ):
        if len(reader) == 0:
            raise ValueError("an image dataset needs at least one image")
        self.reader, self.transform, self.min_size, self.repeats = reader, transform, min_size, repeats
        self._bad: set[int] = set()  # per process (each worker has its copy): bad images are decoded once

    def __len__(self) -> int:
        return len(self.reader) * self.repeats

    def __getitem__(self, key: int | Sample) -> dict[str, Any]:
        index, generator = key, None
        if isinstance(key, Sample):
            index, generator = key.index, torch.Generator().manual_seed(key.seed)

        def read(position: int) -> Image.Image:
            image = self.reader.read(position)
            check_size(image.size, self.min_size, self.reader.name(position))
            return image

        image, skipped = first_readable(index, len(self.reader), self._bad, read, self.reader.name)
        return {"image": self.transform(image, generator), "skipped": skipped}


class StreamingImageDataset(IterableDataset):
    """A streamed `datasets.IterableDataset` as `{"image", "skipped"}` items; bad rows are skipped in passing.

    Sharding across ranks is done beforehand (`split_dataset_by_node`); `datasets` itself splits shards
    across DataLoader workers. The shuffle is reseeded each pass: the epoch is counted here, because
    persistent workers keep their own copy of this object and never see a `set_epoch` call made in the main
    process.
    """

    def __init__(
        self,
        dataset: Any,
        column: str,
        label: str,
        transform: Callable[[Image.Image], torch.Tensor],
        min_size: int,
        shuffle_seed: int | None = None,
    ):
        super().__init__()
        if shuffle_seed is not None:
            dataset = dataset.shuffle(seed=shuffle_seed, buffer_size=STREAMING_SHUFFLE_BUFFER)
        self.dataset, self.column, self.label = dataset, column, label
        self.transform, self.min_size = transform, min_size
        self._epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self._epoch)
        self._epoch += 1
        skipped: list[Skip] = []
        pending: dict[str, Any] | None = None
        for index, row in enumerate(self.dataset):
            name = row_name(row[self.column], f"{self.label}[{index}]")
            try:
                image = load_image(row[self.column], name=name)
                check_size(image.size, self.min_size, name)
            except ImageError as error:
                skipped.append((name, str(error)))
                continue
            # Hold each item back by one so that bad rows at the very end still ride on the last item.
            if pending is not None:
                yield pending
            pending, skipped = {"image": self.transform(image), "skipped": skipped}, []
        if pending is not None:
            pending["skipped"] += skipped
            yield pending


class EpochSampler(DistributedSampler):
    """The training order: a permutation per epoch seeded by (seed, epoch), of which each of `world_size` ranks
    takes every `world_size`-th item, as `DistributedSampler` does (a subclass, so Lightning keeps it under DDP).

    Items come out as `Sample`s whose crop seed is derived from (seed, epoch, index): a crop depends neither on
    the worker that decodes it nor on where a run was resumed. `skip` of this rank's items are passed over,
    unread, at the start of the next pass: where a resumed run picks its epoch up.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[Sample]:
        size = len(self.dataset)
        order = torch.randperm(size, generator=seeded_generator(self.seed, self.epoch, "order")).tolist()
        # Repeated to a multiple of world_size, so that every rank runs as many batches.
        order = (order * math.ceil(self.total_size / size))[: self.total_size]
        skip, self.skip = self.skip, 0
        for index in order[self.rank:self.total_size:self.num_replicas][skip:]:
            yield Sample(index, derived_seed(self.seed, self.epoch, index, "crop"))


class ResumableLoader(DataLoader):
    """The training DataLoader, whose place in the data goes into Lightning's checkpoints.

    Lightning saves `state_dict()` of a training loader that has one with every checkpoint, and on resume hands
    it to `load_state_dict` before the first batch is drawn. The place is counted here, in the main process, as
    batches reach the training loop: the workers read ahead, so how far they got says nothing.
    """

    sampler: EpochSampler

    def __init__(self, dataset: Dataset, sampler: EpochSampler, **options: Any):
        super().__init__(dataset, sampler=sampler, **options)
        self._served = 0  # items of this rank's epoch handed out so far

    def __iter__(self) -> Iterator[Any]:
        self._served = self.sampler.skip
        for batch in super().__iter__():
            self._served = min(self._served + self.batch_size, self.sampler.num_samples)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "served": self._served, "world_size": self.sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, served = state["epoch"], state["served"]
        if state["world_size"] != self.sampler.num_replicas:
            rank_zero_warn(
                f"the checkpoint was written by a run on {state['world_size']} processes, this one has "
                f"{self.sampler.num_replicas}: epoch {epoch} starts over, so its first images are seen twice"
            )
            served = 0
        if served >= self.sampler.num_samples:  # saved after the epoch's last batch: the next epoch is due
            epoch, served = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = served
        self._served = served


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images to (B, 3, R, R), and stored latents (`EncodedCrops`) likewise; concatenate the skip reports."""
    batch = {name: torch.stack([item[name] for item in items]) for name in items[0] if name != "skipped"}
    return batch | {"skipped": [skip for item in items for skip in item["skipped"]]}


class ImageDataModule(L.LightningDataModule):
    """Training and validation images for the autoencoder.

    How `source` (and `val_source`) is read:
      * None: the demo set, photos bundled with scikit-image (offline). Training takes random crops of seven
        photos; validation is the centre crop of two other photos (chelsea, coffee) held out whole.
      * an existing directory with image files: every image under it, recursively (`.jpg .png .webp ...`).
      * `imagefolder:PATH`, `webdataset:PATH`, `parquet:PATH`, `arrow:PATH`: that `datasets` builder, with
        PATH a directory (data_dir) or a file / glob (data_files).
      * a directory written by `Dataset.save_to_disk`: `datasets.load_from_disk`.
      * anything else (a hub name, a local dataset repository): `datasets.load_dataset(source, split=split)`.

    Validation comes from `val_source` if given, else from `val_split` of the same source (e.g. "validation"),
    else from a deterministic held-out part of the training source: `val_count` images (default: a
    `val_holdout` fraction; for a stream, the first 1000). `val_count` also caps a `val_source`/`val_split`.

    Batches: the dataloaders yield `{"image": (B, 3, R, R) float in [-1, 1], "skipped": [(name, reason)]}`.
    Inside a Trainer, `on_before_batch_transfer` records the skips and hands the LightningModule just the
    image tensor (B, 3, R, R). Skipped files are in `self.skipped` ({name: reason}); DDP ranks count their
    own. Training batches of stored latents (`latents`) also hold "latent" (B, C, R/f, R/f), and "logvar" for a
    stored posterior; those reach the module as the whole dict.
    """

    def __init__(
        self,
        source: str | None = None,
        val_source: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        image_column: str = "image",
        streaming: bool = False,
        resolution: int = 256,
        val_resolution: int | None = None,
        batch_size: int = 8,
        num_workers: int = 4,
        min_size: int = 128,
        random_flip: bool = True,
        val_holdout: float = 0.01,
        val_count: int | None = None,
        seed: int = 0,
        latents: str | None = None,
    ):
        """
        Args:
            source: training images (see the class docstring); None trains on the bundled demo photos.
            val_source: validation images, read like `source`; None holds validation out of `source`.
            split: the `datasets` split of `source` ("train" is what hub datasets and builders name it).
            val_split: a split of `source` to validate on, e.g. "validation" (or of `val_source` if set).
            image_column: the column holding images in a `datasets` source (webdataset names it by extension,
                e.g. "jpg").
            streaming: stream a `datasets` source instead of downloading it (no length; sharded by rank).
            resolution: training crop size; 256 is the SD-VAE recipe.
            val_resolution: validation size (shorter side resized, centre crop); None: same as `resolution`.
            batch_size: images per batch per device.
            num_workers: DataLoader processes decoding images; 0 decodes in the main process.
            min_size: images whose shorter side is below this are skipped: upscaling them more than 2x
                (at 256) would mostly teach the decoder blur.
            random_flip: mirror half of the training crops; photos look as natural mirrored.
            val_holdout: fraction of `source` held out for validation when neither `val_source` nor
                `val_split` is given (1% keeps validation small next to training).
            val_count: number of validation images (held out, or the first of `val_source`); None: see above.
            seed: seeds the held-out split, the training order and crops, and the stream shuffle, so reruns
                see the same images in the same order (`seed_everything` seeds the model, not the data).
            latents: a `vaegan encode` folder of a distillation teacher's latents: train on them and the images
                they were encoded from (`source` says where those are if they moved) instead of encoding every
                batch again; see `vaegan.train.encoded`.
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= val_holdout < 1.0:
            raise ValueError(f"--data.val_holdout={val_holdout} must be a fraction in [0, 1)")
        if streaming and (source is None or is_image_folder(source)):
            raise ValueError(
                f"streaming applies to `datasets` sources; source={source!r} is read from disk directly "
                "(use imagefolder:PATH to stream a local folder)"
            )
        self.source, self.val_source, self.split, self.val_split = source, val_source, split, val_split
        self.image_column, self.streaming = image_column, streaming
        self.resolution, self.val_resolution = resolution, val_resolution or resolution
        self.batch_size, self.num_workers, self.min_size = batch_size, num_workers, min_size
        self.random_flip, self.seed = random_flip, seed
        self.val_holdout, self.val_count = val_holdout, val_count
        if latents is not None and streaming:
            raise ValueError(f"--data.latents={latents} reads images by index; it does not stream")
        # Opened here rather than in `setup`, so that a wrong folder is refused before any training starts.
        self.encoded: EncodedLatents | None = open_encoded(latents, source) if latents is not None else None
        self.skipped: dict[str, str] = {}
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    @property
    def num_skipped(self) -> int:
        """How many distinct files (or rows) were skipped so far, at setup and while loading."""
        return len(self.skipped)

    def record_skips(self, skips: list[Skip]) -> None:
        """Count skipped files and warn once per file (rank zero only, like all Lightning warnings)."""
        for name, reason in skips:
            if name not in self.skipped:
                self.skipped[name] = reason
                rank_zero_warn(f"skipped image {reason} ({len(self.skipped)} skipped so far)")

    def prepare_data(self) -> None:
        """Download hub sources once per node before every rank opens them (from the cache) in `setup`."""
        if self.streaming or self.source is None or self.encoded is not None:
            return
        sources = [(self.source, self.split)]
        if self.val_source is not None or self.val_split is not None:
            sources.append((self.val_source or self.source, self.val_split or self.split))
        for spec, split in sources:
            if not is_image_folder(spec):
                load_hub_source(spec, split, streaming=False)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train_crop = TrainCrop(self.resolution, self.random_flip)
        val_crop = EvalCrop(self.val_resolution)
        if self.encoded is not None:
            self._setup_encoded(val_crop)
        elif self.source is None:
            # The demo photos are all large and clean: no tiny check needed beyond the crop's own upscaling.
            self.train_dataset = ImageDataset(
                load_demo_photos(DEMO_TRAIN_PHOTOS), train_crop, min_size=0, repeats=DEMO_CROPS_PER_PHOTO
            )
            self.val_dataset = ImageDataset(load_demo_photos(DEMO_VAL_PHOTOS), val_crop, min_size=0)
        elif self.streaming:
            self._setup_streaming(train_crop, val_crop)
        else:
            self._setup_map_style(train_crop, val_crop)

    def _setup_map_style(self, train_crop: TrainCrop, val_crop: EvalCrop) -> None:
        train = self._reader(self.source, self.split)
        if self.val_source is not None or self.val_split is not None:
            spec = self.val_source or self.source
            val = self._reader(spec, self.val_split or self.split)
            val = ReaderSubset(val, range(min(len(val), self.val_count or len(val))))
        else:
            held_out = self.val_count or max(1, round(self.val_holdout * len(train)))
            if held_out >= len(train):
                raise ValueError(
                    f"{self.source}: holding out {held_out} of {len(train)} images leaves nothing "
                    "to train on; lower val_count / val_holdout or give val_source"
                )
            kept, val = held_out_split(len(train), held_out, self.seed)
            train, val = ReaderSubset(train, kept), ReaderSubset(train, val)
        self.train_dataset = ImageDataset(train, train_crop, self.min_size)
        self.val_dataset = ImageDataset(val, val_crop, self.min_size)

    def _setup_encoded(self, val_crop: EvalCrop) -> None:
        held_out = 0
        if self.val_source is None and self.val_split is None:
            held_out = self.val_count or max(1, round(self.val_holdout * len(self.encoded.latents)))
        train, val_indices, skipped = split_encoded(self.encoded, self.resolution, held_out, self.seed)
        self.record_skips(skipped)
        self.train_dataset = EncodedCrops(self.encoded, train, self.resolution)
        if held_out:
            val = ReaderSubset(self.encoded.reader, val_indices)
        else:
            val = self._reader(self.val_source or self.encoded.source, self.val_split or self.split)
            val = ReaderSubset(val, range(min(len(val), self.val_count or len(val))))
        self.val_dataset = ImageDataset(val, val_crop, self.min_size)

    def _reader(self, spec: str, split: str) -> ImageReader:
        reader, skipped = open_reader(spec, split, self.image_column, self.min_size)
        self.record_skips(skipped)
        return reader

    def _setup_streaming(self, train_crop: TrainCrop, val_crop: EvalCrop) -> None:
        from datasets.distributed import split_dataset_by_node

        train = image_column_only(
            load_hub_source(self.source, self.split, True), self.image_column, self.source
        )
        if self.val_source is not None or self.val_split is not None:
            spec = self.val_source or self.source
            val = image_column_only(
                load_hub_source(spec, self.val_split or self.split, True), self.image_column, spec
            )
            val = val.take(self.val_count) if self.val_count else val
        else:
            held_out = self.val_count or STREAMING_HOLDOUT
            train, val = train.skip(held_out), train.take(held_out)
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if world_size > 1:
            train = split_dataset_by_node(train, rank=rank, world_size=world_size)
            val = split_dataset_by_node(val, rank=rank, world_size=world_size)
        self.train_dataset = StreamingImageDataset(
            train, self.image_column, self.source, train_crop, self.min_size, shuffle_seed=self.seed
        )
        self.val_dataset = StreamingImageDataset(
            val, self.image_column, str(self.val_source or self.source), val_crop, self.min_size
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if self.streaming:
            return self._loader(self.train_dataset)
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = EpochSampler(self.train_dataset, self.seed, rank, world_size)
        return self._loader(self.train_dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return self._loader(self.val_dataset)

    def _loader(self, dataset: Dataset, sampler: EpochSampler | None = None) -> DataLoader:
        options = dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_images,
            # Workers keep their copies (and the datasets' bad-index memory) across epochs, and start once.
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
        return DataLoader(dataset, **options) if sampler is None else ResumableLoader(dataset, sampler, **options)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the batch's skipped files; the LightningModule receives the image tensor (B, 3, R, R), or with
        stored latents the dict of image and latents."""
        if isinstance(batch, dict) and "skipped" in batch:
            self.record_skips(batch.pop("skipped"))
            return batch if "latent" in batch else batch["image"]
        return batch

    def teardown(self, stage: str) -> None:
        if self.skipped:
            rank_zero_info(f"{self.num_skipped} images were skipped as unreadable or tiny (see `skipped`)")
