"""What dataset encoding reads, in which order and in which shard; and the worker processes that read it.

A source lists its items in a fixed order and cuts them into shards that do not depend on the run:
  * an image folder or a map-style `datasets` source (an `ImageReader`): shard k is items
    [k * shard_size, (k + 1) * shard_size) of the reader's order (files sorted by path, rows by index);
  * a streamed `datasets` source: shard k is all rows of the source's own shard k (usually one file), since a
    stream has no length to cut; id = "k/row", or an `id_column` value (`__key__` for webdataset).
`ShardBatches` runs in DataLoader workers: it reads whole shards, decodes each image, sizes it with the
resolution policy and yields `ImageBatch`es of one shape, then a `ShardEnd` per shard with its errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from vaegan.buckets import ResolutionPolicy
from vaegan.images import ImageError, check_size, load_image
from vaegan.readers import ImageReader, image_column_only, is_image_folder, load_hub_source, open_reader

# (index within the source or source shard, id, a call that decodes the image or raises ImageError)
Item = tuple[int, str, Callable[[], Image.Image]]


class ReaderSource:
    """An image folder or a map-style `datasets` source, cut into shards of `shard_size` items."""

    def __init__(self, reader: ImageReader, shard_size: int):
        self.reader, self.shard_size = reader, shard_size
        self.kind = reader.kind
        self.num_items = len(reader)
        self.num_shards = math.ceil(self.num_items / shard_size)

    def fingerprint(self) -> str:
        return self.reader.fingerprint()

    def shard_items(self, shard: int) -> int:
        return min(self.shard_size, self.num_items - shard * self.shard_size)

    def items(self, shard: int) -> Iterator[Item]:
        for index in range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items)):
            yield index, self.reader.id(index), partial(self.reader.read, index)


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
                yield row, name, partial(load_image, value, name=name)
                row += 1


Source = ReaderSource | StreamSource


def open_source(
    input: str, shard_size: int, split: str = "train", image_column: str = "image", id_column: str | None = None,
    streaming: bool = False,
) -> Source:
    """`input` as a source: a folder holding images, or anything `vaegan.readers.load_hub_source` opens (a local
    dataset folder, `imagefolder:PATH`, `webdataset:PATH`, `parquet:PATH`, a `save_to_disk` folder, a hub name)."""
    if not streaming:
        reader, _ = open_reader(input, split, image_column, min_size=0, id_column=id_column, scan=False)
        return ReaderSource(reader, shard_size)
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
    less to copy than floats)."""

    shard: int
    pixels: torch.Tensor        # (B, 3, H, W) uint8, a channels-last view of the stacked (B, H, W, 3)
    ids: list[str]
    indices: torch.Tensor       # (B,) int64
    source_sizes: torch.Tensor  # (B, 2) int32: (height, width) of each source image, after EXIF rotation
    boxes: torch.Tensor         # (B, 4) float32: (left, top, right, bottom) of the encoded region, source pixels

    def pin_memory(self) -> ImageBatch:
        """Called by a DataLoader with `pin_memory=True`."""
        return replace(self, pixels=self.pixels.pin_memory())


@dataclass(frozen=True)
class ShardEnd:
    """After the last batch of a shard: how many items it had, and the ones that could not be encoded."""

    shard: int
    items: int
    errors: list[dict]  # {"id", "index", "shard", "reason"}


class ShardBatches(IterableDataset):
    """Reads whole shards, sizes each image by the policy and yields batches of one shape: per shard, a batch as
    soon as `batch_size` images of one shape are ready and the leftovers at the end, then a `ShardEnd`."""

    def __init__(self, source: Source, shards: list[int], policy: ResolutionPolicy, batch_size: int):
        super().__init__()
        self.source, self.shards, self.policy, self.batch_size = source, shards, policy, batch_size

    def __iter__(self) -> Iterator[ImageBatch | ShardEnd]:
        worker = get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id::worker.num_workers]
        for shard in shards:
            yield from self.shard_batches(shard)

    def shard_batches(self, shard: int) -> Iterator[ImageBatch | ShardEnd]:
        buckets: dict[tuple[int, int], list[dict]] = {}
        errors: list[dict] = []
        items = 0
        for index, name, read in self.source.items(shard):
            items += 1
            try:
                row = self.prepare(index, name, read)
            except ImageError as error:
                errors.append({"id": name, "index": index, "shard": shard, "reason": str(error)})
                continue
            bucket = buckets.setdefault(row["pixels"].shape[:2], [])
            bucket.append(row)
            if len(bucket) == self.batch_size:
                yield stack_rows(shard, buckets.pop(row["pixels"].shape[:2]))
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
            "id": name, "index": index, "source_size": (image.height, image.width), "box": box,
        }


def stack_rows(shard: int, rows: list[dict]) -> ImageBatch:
    """Prepared images of one shape -> a batch."""
    return ImageBatch(
        shard=shard,
        pixels=torch.from_numpy(np.stack([row["pixels"] for row in rows])).permute(0, 3, 1, 2),
        ids=[row["id"] for row in rows],
        indices=torch.tensor([row["index"] for row in rows], dtype=torch.int64),
        source_sizes=torch.tensor([row["source_size"] for row in rows], dtype=torch.int32),
        boxes=torch.tensor([row["box"] for row in rows], dtype=torch.float32),
    )
