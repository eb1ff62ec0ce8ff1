"""What dataset encoding reads, in which order and in which shard; and the worker processes that read it.

A source lists its items in a fixed order and cuts them into shards that do not depend on the run:
  * an image folder or a map-style `datasets` source (an `ImageReader`): shard k is items
    [k * shard_size, (k + 1) * shard_size) of the reader's order (files sorted by path, rows by index);
  * a streamed `datasets` source: shard k is all rows of the source's own shard k (usually one file), since a
    stream has no length to cut; id = "k/row", or an `id_column` value (`__key__` for webdataset);
  * WebDataset tars or Parquet files (`vaegan.images.shard_files`, at any URL): shard k is file k, streamed;
    id = the sample's key (tars), the `id_column` value or "FILE/ROW" (Parquet). Side columns (`keep_columns`)
    travel with each item. A file that breaks off is an error row naming it, after the samples read before.
`ShardBatches` runs in DataLoader workers: it reads whole shards, decodes each image, sizes it with the
resolution policy and yields `ImageBatch`es of one shape, then a `ShardEnd` per shard with its errors. With
`decode_jpeg="device"` the workers leave JPEGs undecoded, planning only their crops from their headers, and the
encoding process decodes them on its device (`ImageBatch.on_device`, `vaegan.images.jpegs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from vaegan.images.buckets import ResolutionPolicy
from vaegan.images.crops import check_size
from vaegan.images.jpegs import JpegImage, decode_jpegs, jpeg_header
from vaegan.images.readers import ImageReader, image_column_only, is_image_folder, load_hub_source, open_reader
from vaegan.images.reading import ImageError, encoded_bytes, load_image
from vaegan.images.shard_files import (
    IMAGE_EXTENSIONS,
    ShardReadError,
    file_fingerprint,
    list_shard_files,
    parquet_samples,
    tar_samples,
)

# (index within the source or source shard, id, a call that decodes the image or raises ImageError, a call that
# returns the file as stored and its name for error messages, or None when there is no file, kept side columns)
Item = tuple[int, str, Callable[[], Image.Image], Callable[[], tuple[bytes, str] | None], dict[str, str]]


class ReaderSource:
    """An image folder or a map-style `datasets` source, cut into shards of `shard_size` items."""

    def __init__(self, reader: ImageReader, shard_size: int, max_items: int | None = None):
        self.reader, self.shard_size = reader, shard_size
        self.kind = reader.kind
        self.num_items = len(reader) if max_items is None else min(len(reader), max_items)
        self.num_shards = math.ceil(self.num_items / shard_size)

    def fingerprint(self) -> str:
        return self.reader.fingerprint()

    def shard_items(self, shard: int) -> int:
        return min(self.shard_size, self.num_items - shard * self.shard_size)

    def items(self, shard: int) -> Iterator[Item]:
        for index in range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items)):
            yield (index, self.reader.id(index), partial(self.reader.read, index), partial(self.reader.encoded, index),
                   {})


class StreamSource:
    """A streamed `datasets.IterableDataset`: output shard k holds the rows of its source shard k (a file).

    An item's id is "k/row" or the value of `id_column` (`__key__` for webdataset). Parallelism is bounded by the
    number of source shards; each is read once, by one worker of one rank.
    """

    kind = "stream"

    def __init__(self, dataset: Any, column: str, id_column: str | None, label: str):
        if not hasattr(dataset, "shard"):
            raise RuntimeError("streaming needs datasets >= 3.0 (IterableDataset.shard); upgrade datasets")
        self.dataset, self.column, self.id_column, self.label = dataset, column, id_column, label
        self.num_items = None
        self.num_shards = dataset.num_shards

    def fingerprint(self) -> str:
        return f"{self.num_shards} source shards"

    def items(self, shard: int) -> Iterator[Item]:
        part = self.dataset.shard(num_shards=self.num_shards, index=shard)
        row = 0
        # `iter(batch_size)` rather than `for row in part`: inside a DataLoader worker, plain iteration makes
        # `datasets` split the (single) source shard between the workers again, and most would get nothing.
        rows = part.iter(batch_size=64)
        while True:
            try:
                batch = next(rows, None)
            except Exception as error:  # the reader (tar, network, parquet) failed, not an image
                raise RuntimeError(
                    f"{self.label}: reading source shard {shard} failed after {row} rows ({error}); rerun to resume"
                ) from error
            if batch is None:
                return
            for offset, value in enumerate(batch[self.column]):
                name = str(batch[self.id_column][offset]) if self.id_column else f"{shard}/{row}"
                yield row, name, partial(load_image, value, name=name), partial(_encoded, value, name), {}
                row += 1


class FileShardSource:
    """WebDataset tars or Parquet files, local or at URLs: output shard k holds the samples of file k, read front
    to back once by one worker."""

    num_items = None

    def __init__(self, spec: str, kind: str, image_column: str, id_column: str | None, keep: tuple[str, ...]):
        self.kind, self.keep = kind, keep
        self.urls = list_shard_files(spec, f".{kind}")
        self.num_shards = len(self.urls)
        if kind == "tar":
            if id_column not in (None, "__key__"):
                raise ValueError(f"--id_column {id_column}: a tar sample's id is its key; leave id_column unset")
            self.read = partial(tar_samples, image_extensions=IMAGE_EXTENSIONS if image_column == "image"
                                else (image_column,), keep=keep)
        else:
            self.read = partial(parquet_samples, image_column=image_column, id_column=id_column, keep=keep)

    def fingerprint(self) -> str:
        return file_fingerprint(self.urls)

    def items(self, shard: int) -> Iterator[Item]:
        index = 0
        try:
            for sample in self.read(self.urls[shard]):
                index = sample.index + 1
                read = partial(load_image, sample.data, name=sample.name) if sample.data is not None else \
                    partial(_refuse, f"{sample.name}: {sample.missing}")
                encoded = (lambda data=sample.data, name=sample.name: (data, name)) if sample.data is not None \
                    else (lambda: None)
                yield sample.index, sample.id, read, encoded, sample.extras
        except ShardReadError as error:  # the file breaks off: one error row for the rest of it
            yield index, self.urls[shard], partial(_refuse, str(error)), lambda: None, {}


def _refuse(reason: str) -> Image.Image:
    raise ImageError(reason)


def shard_file_kind(spec: str) -> str | None:
    """"tar" or "parquet" for a spec naming such files (a file, a glob, a brace pattern), else None."""
    for kind in ("tar", "parquet"):
        if spec.rstrip("/").endswith(f".{kind}"):
            return kind
    return None


def _encoded(value: Any, name: str) -> tuple[bytes, str] | None:
    data = encoded_bytes(value)
    return None if data is None else (data, name)


Source = ReaderSource | StreamSource | FileShardSource


def open_source(
    input: str, shard_size: int, split: str = "train", image_column: str = "image", id_column: str | None = None,
    streaming: bool = False, max_items: int | None = None, keep: tuple[str, ...] = (),
) -> Source:
    """`input` as a source: a folder holding images, or anything `vaegan.images.readers.load_hub_source` opens (a local
    dataset folder, `imagefolder:PATH`, `webdataset:PATH`, `parquet:PATH`, a `save_to_disk` folder, a hub name)."""
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_images={max_items} must be at least 1")
    kind = shard_file_kind(input)
    if kind is not None:
        if max_items is not None:
            raise ValueError(f"max_images: {input} is read a file at a time; pick fewer files instead")
        return FileShardSource(input, kind, image_column, id_column, keep)
    if keep:
        raise ValueError(f"--keep_columns applies to WebDataset tars and Parquet files; {input} is neither")
    if not streaming:
        reader, _ = open_reader(input, split, image_column, min_size=0, id_column=id_column, scan=False)
        return ReaderSource(reader, shard_size, max_items)
    if max_items is not None:
        raise ValueError("max_images needs a source read by index: a stream is cut into shards by its files")
    if is_image_folder(input):
        raise ValueError(f"{input} is a folder, read directly; use imagefolder:{input} to stream it")
    dataset = load_hub_source(input, split, streaming=True)
    names = dataset.column_names
    if id_column and names is not None and id_column not in names:
        raise ValueError(f"{input} has no column {id_column!r} for ids; its columns are {names}")
    dataset = image_column_only(dataset, image_column, input, (id_column,) if id_column else ())
    return StreamSource(dataset, image_column, id_column, input)


# ---- worker processes ----


@dataclass(frozen=True)
class ImageBatch:
    """Images of one shard and one shape, on their way to the encoder; pixels stay uint8 until the device (4x
    less to copy than floats). With `decode_jpeg="device"` some are still JPEGs, decoded by `on_device`."""

    shard: int
    pixels: torch.Tensor        # (B - J, 3, H, W) uint8, the images decoded by PIL, a channels-last view
    ids: list[str]
    indices: torch.Tensor       # (B,) int64
    source_sizes: torch.Tensor  # (B, 2) int32: (height, width) of each source image, after EXIF rotation
    boxes: torch.Tensor         # (B, 4) float32: (left, top, right, bottom) of the encoded region, source pixels
    jpegs: list[JpegImage]      # J images to decode on the device
    is_jpeg: torch.Tensor       # (B,) bool: the rows that are `jpegs`, in order; the others are `pixels`, in order
    extras: list[dict[str, str]]  # (B,) each row's kept side columns (`keep_columns`)

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> ImageBatch:
        """Called by a DataLoader with `pin_memory=True`."""
        return replace(self, pixels=self.pixels.pin_memory())

    def on_device(self, device: torch.device) -> tuple[ImageBatch, list[dict], int]:
        """The batch with all its pixels on `device`, its JPEGs decoded there (`vaegan.images.jpegs.decode_jpegs`).

        A JPEG that decode_jpeg refuses is read by PIL here, as a worker would have read it; one that PIL cannot
        read either is left out of the batch. Returns the batch, the errors of the images left out (as
        `ShardEnd.errors`) and how many JPEGs PIL read.
        """
        if not self.jpegs:
            return replace(self, pixels=self.pixels.to(device, non_blocking=True)), [], 0
        pixels = torch.empty((len(self), *self.pixels.shape[1:]), dtype=torch.uint8, device=device)  # (B, 3, H, W)
        pixels[~self.is_jpeg.to(device)] = self.pixels.to(device, non_blocking=True)
        decoded = decode_jpegs(self.jpegs, device)
        errors, read_by_pil, kept = [], 0, torch.ones(len(self), dtype=torch.bool)
        for position, image, crop in zip(self.is_jpeg.nonzero().flatten().tolist(), self.jpegs, decoded, strict=True):
            if crop is None:
                read_by_pil += 1
                try:
                    crop = to_pixels(image.plan.apply(load_image(image.data, name=image.name)))
                except ImageError as error:
                    kept[position] = False
                    errors.append({"id": self.ids[position], "index": int(self.indices[position]),
                                   "shard": self.shard, "reason": str(error)})
                    continue
            pixels[position] = crop
        keep = kept.nonzero().flatten()
        batch = replace(
            self, pixels=pixels[keep.to(device)], ids=[self.ids[i] for i in keep.tolist()], indices=self.indices[keep],
            source_sizes=self.source_sizes[keep], boxes=self.boxes[keep], jpegs=[],
            extras=[self.extras[i] for i in keep.tolist()],
            is_jpeg=torch.zeros(len(keep), dtype=torch.bool),
        )
        return batch, errors, read_by_pil


@dataclass(frozen=True)
class ShardEnd:
    """After the last batch of a shard: how many items it had, and the ones that could not be encoded."""

    shard: int
    items: int
    errors: list[dict]  # {"id", "index", "shard", "reason"}


class ShardBatches(IterableDataset):
    """Reads whole shards, sizes each image by the policy and yields batches of one shape: per shard, a batch as
    soon as `batch_size` images of one shape are ready and the leftovers at the end, then a `ShardEnd`.

    `decode_jpeg="device"`: JPEGs are planned from their headers and passed on undecoded (see `ImageBatch.on_device`);
    every other image, and each JPEG whose header says the device would not read it as PIL does, is decoded here.
    """

    def __init__(
        self, source: Source, shards: list[int], policy: ResolutionPolicy, batch_size: int,
        decode_jpeg: Literal["workers", "device"] = "workers",
    ):
        super().__init__()
        self.source, self.shards, self.policy, self.batch_size = source, shards, policy, batch_size
        self.decode_jpeg = decode_jpeg

    def __iter__(self) -> Iterator[ImageBatch | ShardEnd]:
        worker = get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id::worker.num_workers]
        for shard in shards:
            yield from self.shard_batches(shard)

    def shard_batches(self, shard: int) -> Iterator[ImageBatch | ShardEnd]:
        buckets: dict[tuple[int, int], list[dict]] = {}
        errors: list[dict] = []
        items = 0
        for index, name, read, encoded, extras in self.source.items(shard):
            items += 1
            try:
                row = self.plan_jpeg(index, name, encoded) if self.decode_jpeg == "device" else None
                if row is None:
                    row = self.prepare(index, name, read)
            except ImageError as error:
                errors.append({"id": name, "index": index, "shard": shard, "reason": str(error)})
                continue
            row["extras"] = extras
            bucket = buckets.setdefault(row["shape"], [])
            bucket.append(row)
            if len(bucket) == self.batch_size:
                yield stack_rows(shard, buckets.pop(row["shape"]))
        for shape in sorted(buckets):
            yield stack_rows(shard, buckets[shape])
        yield ShardEnd(shard, items, errors)

    def prepare(self, index: int, name: str, read: Callable[[], Image.Image]) -> dict[str, Any]:
        image = read()
        check_size(image.size, self.policy.min_size, name)
        try:
            pixels, box = self.policy.apply(image)
        except ImageError as error:
            raise ImageError(f"{name}: {error}") from error
        return {
            "pixels": np.asarray(pixels, dtype=np.uint8),  # (H, W, 3)
            "shape": (pixels.height, pixels.width), "id": name, "index": index,
            "source_size": (image.height, image.width), "box": box,
        }

    def plan_jpeg(self, index: int, name: str, encoded: Callable[[], tuple[bytes, str] | None]) -> dict | None:
        """A JPEG's row, planned from its header and left undecoded; None for anything else."""
        file = encoded()
        header = jpeg_header(file[0]) if file else None
        if header is None:
            return None
        width, height, orientation = header
        check_size((width, height), self.policy.min_size, name)
        try:
            plan = self.policy.plan(width, height)
        except ImageError as error:
            raise ImageError(f"{name}: {error}") from error
        return {
            "jpeg": JpegImage(file[0], file[1], orientation, plan),
            "shape": plan.size[::-1], "id": name, "index": index, "source_size": (height, width), "box": plan.box,
        }


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (3, H, W) uint8, a channels-last view."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def stack_rows(shard: int, rows: list[dict]) -> ImageBatch:
    """Prepared images of one shape -> a batch."""
    decoded = [row["pixels"] for row in rows if "pixels" in row]
    height, width = rows[0]["shape"]
    return ImageBatch(
        shard=shard,
        pixels=torch.from_numpy(np.stack(decoded) if decoded else np.zeros((0, height, width, 3), np.uint8)).permute(
            0, 3, 1, 2),
        ids=[row["id"] for row in rows],
        extras=[row["extras"] for row in rows],
        indices=torch.tensor([row["index"] for row in rows], dtype=torch.int64),
        source_sizes=torch.tensor([row["source_size"] for row in rows], dtype=torch.int32),
        boxes=torch.tensor([row["box"] for row in rows], dtype=torch.float32),
        jpegs=[row["jpeg"] for row in rows if "jpeg" in row],
        is_jpeg=torch.tensor(["jpeg" in row for row in rows], dtype=torch.bool),
    )
