"""What dataset encoding reads, in which order and in which shard; and the worker processes that read it.

A source lists its items in a fixed order and cuts them into shards that do not depend on the run:
  * an image folder: files with an image extension, recursively, sorted by path; shard k is items
    [k * shard_size, (k + 1) * shard_size); an item's id is its path relative to the folder;
  * a map-style `datasets` source: rows by index, cut the same way; id = row index, or an `id_column` value;
  * a streamed `datasets` source: shard k is all rows of the source's own shard k (usually one file), since a
    stream has no length to cut; id = "k/row", or an `id_column` value (`__key__` for webdataset).
`ShardBatches` runs in DataLoader workers: it reads whole shards, decodes each image with `load_image`, sizes it
with the resolution policy and yields batches of one shape, plus an end marker per shard with its errors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vaegan.buckets import ResolutionPolicy
from vaegan.images import ImageError, is_tiny, load_image
from vaegan.readers import image_column_only, is_image_folder, list_image_files, load_hub_source, tiny_error


class FolderSource:
    """Image files under a folder, recursively, sorted by path; an item's id is its path relative to the folder."""

    kind = "folder"

    def __init__(self, root: Path, shard_size: int):
        self.root, self.shard_size = root, shard_size
        self.names = [path.relative_to(root).as_posix() for path in list_image_files(root)]
        self.num_items = len(self.names)
        self.num_shards = math.ceil(self.num_items / shard_size)

    def fingerprint(self) -> str:
        """Changes when a file is added, removed or renamed: any of those would shift items between shards."""
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()

    def items(self, shard: int) -> Iterator[tuple[int, str, Any]]:
        """(index, id, what `load_image` reads) for every item of `shard`."""
        for index in range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items)):
            yield index, self.names[index], self.root / self.names[index]


class DatasetSource:
    """A map-style `datasets.Dataset`; an item's id is its row index, or the value of `id_column`."""

    kind = "dataset"

    def __init__(self, dataset: Any, column: str, id_column: str | None, shard_size: int):
        self.dataset, self.column, self.id_column, self.shard_size = dataset, column, id_column, shard_size
        self.num_items = len(dataset)
        self.num_shards = math.ceil(self.num_items / shard_size)

    def fingerprint(self) -> str:
        return f"{self.num_items} rows"

    def items(self, shard: int) -> Iterator[tuple[int, str, Any]]:
        start = shard * self.shard_size
        rows = self.dataset.select(range(start, min(start + self.shard_size, self.num_items)))
        for offset, row in enumerate(rows):
            name = str(row[self.id_column]) if self.id_column else str(start + offset)
            yield start + offset, name, row[self.column]


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

    def items(self, shard: int) -> Iterator[tuple[int, str, Any]]:
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
                yield row, name, value
                row += 1


Source = FolderSource | DatasetSource | StreamSource


def open_source(
    input: str, shard_size: int, split: str = "train", image_column: str = "image", id_column: str | None = None,
    streaming: bool = False,
) -> Source:
    """`input` as a source: a folder holding images, or anything `vaegan.readers.load_hub_source` opens (a local
    dataset folder, `imagefolder:PATH`, `webdataset:PATH`, `parquet:PATH`, a `save_to_disk` folder, a hub name)."""
    if is_image_folder(input):
        if streaming:
            raise ValueError(f"{input} is a folder, read directly; use imagefolder:{input} to stream it")
        return FolderSource(Path(input), shard_size)
    dataset = load_hub_source(input, split, streaming)
    names = dataset.column_names
    if id_column and names is not None and id_column not in names:
        raise ValueError(f"{input} has no column {id_column!r} for ids; its columns are {names}")
    dataset = image_column_only(dataset, image_column, input, (id_column,) if id_column else ())
    if streaming:
        return StreamSource(dataset, image_column, id_column, input)
    return DatasetSource(dataset, image_column, id_column, shard_size)


# ---- worker processes ----


class ShardBatches(IterableDataset):
    """Reads whole shards, sizes each image by the policy and yields batches of one shape.

    Per shard: batches {"shard", "pixels": uint8 (B, 3, H, W), "id", "index", "source_size": (B, 2) as (h, w),
    "box": (B, 4)}, a batch as soon as `batch_size` images of one shape are ready and the leftovers at the end of
    the shard, then an end marker {"shard", "end": True, "items", "errors"}. Pixels stay uint8 until the device:
    4x less to copy than floats.
    """

    def __init__(self, source: Source, shards: list[int], policy: ResolutionPolicy, batch_size: int):
        super().__init__()
        self.source, self.shards, self.policy, self.batch_size = source, shards, policy, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id::worker.num_workers]
        for shard in shards:
            yield from self.shard_batches(shard)

    def shard_batches(self, shard: int) -> Iterator[dict[str, Any]]:
        buckets: dict[tuple[int, int], list[dict]] = {}
        errors: list[dict] = []
        items = 0
        for index, name, raw in self.source.items(shard):
            items += 1
            try:
                row = self.prepare(index, name, raw)
            except ImageError as error:
                errors.append({"id": name, "index": index, "shard": shard, "reason": str(error)})
                continue
            bucket = buckets.setdefault(row["pixels"].shape[:2], [])
            bucket.append(row)
            if len(bucket) == self.batch_size:
                yield collate(shard, buckets.pop(row["pixels"].shape[:2]))
        for shape in sorted(buckets):
            yield collate(shard, buckets[shape])
        yield {"shard": shard, "end": True, "items": items, "errors": errors}

    def prepare(self, index: int, name: str, raw: Any) -> dict[str, Any]:
        image = load_image(raw, name=name)
        if is_tiny(image.size, self.policy.min_size):
            raise tiny_error(name, image.size, self.policy.min_size)
        try:
            pixels, box = self.policy.apply(image)
        except ImageError as error:
            raise ImageError(f"{name}: {error}") from error
        return {
            "pixels": np.asarray(pixels, dtype=np.uint8),  # (H, W, 3)
            "id": name, "index": index, "source_size": (image.height, image.width), "box": box,
        }


def collate(shard: int, rows: list[dict]) -> dict[str, Any]:
    """Rows of one shape -> a batch; pixels (B, 3, H, W) uint8, a channels-last view of the stacked (B, H, W, 3)."""
    pixels = torch.from_numpy(np.stack([row["pixels"] for row in rows])).permute(0, 3, 1, 2)
    return {
        "shard": shard,
        "pixels": pixels,
        "id": [row["id"] for row in rows],
        "index": torch.tensor([row["index"] for row in rows], dtype=torch.int64),
        "source_size": torch.tensor([row["source_size"] for row in rows], dtype=torch.int32),
        "box": torch.tensor([row["box"] for row in rows], dtype=torch.float32),
    }
