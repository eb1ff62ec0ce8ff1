"""`LatentDataset`: encoded latents read back for a diffusion trainer (`vaegan.latents.decode` turns them into images).

    dataset = LatentDataset("/data/latents")                 # samples from the stored posterior each time
    loader = DataLoader(dataset, batch_sampler=dataset.batch_sampler(64, shuffle=True), num_workers=4)
    for batch in loader:
        latents = batch["latent"]                            # (64, C, h, w) float32, normalised, one bucket

Items are normalised latents (what `Codec.encode` returns and a diffusion model trains on), with the SDXL-style
conditioning the shards keep: the source image size and the crop box. Every batch of `batch_sampler` holds one
latent shape (bucket), as a trainer stacking tensors needs.

Reading: the shards stay on disk; an item is read by decoding its Parquet row group (`vaegan.latents.shards`
writes groups of 64 rows), and each process keeps the last `CACHED_ROW_GROUPS` groups decoded. A fully random
order would decode a group per item, so `batch_sampler` shuffles window by window of row groups (see
`BucketBatchSampler`); pass `in_memory=True` to decode everything once up front (about the size of the shard
files) when it fits, and `shuffle_window=None` for a fully random order.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler

from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.latents.manifest import MANIFEST_NAME, shard_files
from vaegan.latents.quantization import column_maps
from vaegan.latents.shards import decode_values, file_metadata, tensor_columns, unnested

# Small per-row columns, read for every row when the dataset opens.
INDEX_COLUMNS = ["id", "index", "latent_shape", "source_height", "source_width", "crop_box"]
# Row groups a shuffle window mixes (8 groups of 64 rows: batches drawn from 512 items at a time).
DEFAULT_SHUFFLE_WINDOW = 8
# Decoded row groups each process keeps: two windows, because a bucket's remainder from the previous window is
# read in the current one; then each group is decoded about once per epoch.
CACHED_ROW_GROUPS = 2 * DEFAULT_SHUFFLE_WINDOW


class LatentDataset(Dataset):
    """The latents of a `vaegan encode` folder (or one shard file) as a map-style torch `Dataset`.

    Item i: {"latent": (C, h, w) float32 normalised, "id": str, "index": int,
             "original_size": (2,) int64 (height, width) of the source, "crop_box": (4,) float32
             (left, top, right, bottom) in source pixels}, plus each kept side column (`kept_columns`) as text.
    """

    def __init__(self, path: str | os.PathLike, sample: bool | None = None, in_memory: bool = False):
        """
        Args:
            path: an output folder of `vaegan encode`, local or a URL (`s3://bucket/latents`, see
                `vaegan.latents.store`), or one of its `train-*.parquet` files. A folder is read as its
                progress records say: committed shards only.
            sample: draw each item from the stored posterior, mean + exp(logvar / 2) * randn, with torch's global
                generator (DataLoader workers seed it per worker and epoch); False returns the mean. None:
                sample when the posterior was stored, else return the stored latent (mean or sample).
            in_memory: decode all latents when the dataset opens instead of on demand (see the module doc).
        """
        self.path = str(path)
        self.location, self.files = shard_files(path)  # a `Store`, and names in it
        metadata = [file_metadata(self.location, file) for file in self.files]
        for key in ("store", "dtype", "vae_sha256", "quantization"):
            values = {repr(entry.get(key)) for entry in metadata}
            if len(values) > 1:
                raise ValueError(f"{self.path}: shards disagree on {key} ({sorted(values)}); not one encoding run")
        normalizations = {LatentNormalization.from_json(entry.get("normalization", entry)) for entry in metadata}
        if len(normalizations) > 1:
            described = sorted(map(str, normalizations))
            raise ValueError(f"{self.path}: shards disagree on the latent normalisation ({described}); "
                             "not one encoding run")
        self.metadata = metadata[0]
        self.normalization = normalizations.pop()  # how the stored latents were normalised
        self.store, self.dtype = self.metadata["store"], self.metadata["dtype"]
        if sample and self.store != "posterior":
            raise ValueError(
                f"{self.path}: sample=True needs the posterior, but these shards store one latent per image "
                f"(store={self.store!r}); pass sample=False or None, or re-encode with store='posterior'"
            )
        self.sample = self.store == "posterior" if sample is None else sample
        self.columns = list(tensor_columns(self.store))
        if not self.sample and self.store == "posterior":
            self.columns = ["mean"]
        self.quantization = column_maps(self.metadata.get("quantization"))  # uint8 latents' maps, by column
        # Side columns of tars and Parquet sources (`vaegan encode --keep_columns`), returned with each item.
        self.kept_columns = list(self.metadata.get("kept_columns", []))
        self.manifest = self.location.read_json(MANIFEST_NAME) if self.location.exists(MANIFEST_NAME) else None
        if self.manifest is not None and not self.manifest.get("complete"):
            warnings.warn(f"{self.path}: encoding is not complete (manifest says so); reading the shards done so far",
                          stacklevel=2)

        tables, locations = [], []
        for number, file in enumerate(self.files):
            parquet = pq.ParquetFile(self.location.open_for_reading(file))
            tables.append(parquet.read(columns=INDEX_COLUMNS))
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                locations.append(np.stack([np.full(rows, number), np.full(rows, group), np.arange(rows)], axis=1))
        self.ids = [value for table in tables for value in table.column("id").to_pylist()]
        self.indices = np.concatenate([table.column("index").to_numpy() for table in tables])
        self.shapes = np.concatenate([_fixed(table, "latent_shape", 3) for table in tables]).astype(np.int64)
        self.original_sizes = np.concatenate([
            np.stack([table.column("source_height").to_numpy(), table.column("source_width").to_numpy()], axis=1)
            for table in tables
        ]).astype(np.int64)
        self.crop_boxes = np.concatenate([_fixed(table, "crop_box", 4) for table in tables]).astype(np.float32)
        self.locations = np.concatenate(locations)  # (N, 3): file, row group, row within the group
        self._files: dict[int, pq.ParquetFile] = {}
        self._groups: OrderedDict[tuple[int, int], dict[str, list[np.ndarray]]] = OrderedDict()
        self._cache_size = math.inf if in_memory else CACHED_ROW_GROUPS
        if in_memory:
            for file, group in np.unique(self.locations[:, :2], axis=0).tolist():
                self._row_group(file, group)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        stored = self.stored(index)
        latent = stored["mean" if "mean" in stored else "latent"]
        if self.sample:
            latent = latent + stored["logvar"].mul(0.5).exp() * torch.randn(latent.shape)
        file, group, row = (int(value) for value in self.locations[index])
        texts = self._row_group(file, group)[1]
        return {
            "latent": latent,                                                   # (C, h, w)
            "id": self.ids[index],
            "index": int(self.indices[index]),
            "original_size": torch.from_numpy(self.original_sizes[index]),      # (2,) height, width
            "crop_box": torch.from_numpy(self.crop_boxes[index]),               # (4,)
        } | {name: values[row] for name, values in texts.items()}               # kept columns: str or None

    def stored(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors stored for item `index`, float32 (C, h, w): "mean" and, unless the dataset was opened with
        sample=False, "logvar" for a stored posterior; "latent" otherwise. For callers that draw their own
        posterior samples (with their own generator)."""
        file, group, row = (int(value) for value in self.locations[index])
        values = self._row_group(file, group)[0]
        return {name: torch.from_numpy(decode_values(values[name][row], self.dtype, self.quantization.get(name)))
                for name in values}

    def _row_group(self, file: int, group: int) -> tuple[dict[str, list[np.ndarray]], dict[str, list]]:
        """One row group through a small LRU cache: its stored latents, one (C, h, w) array per row, and its kept
        columns, one text (or None) per row."""
        key = (file, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        parquet = self._files.get(file)
        if parquet is None:
            parquet = self._files[file] = pq.ParquetFile(self.location.open_for_reading(self.files[file]))
        table = parquet.read_row_group(group, columns=[*self.columns, "latent_shape", *self.kept_columns])
        shapes = _fixed(table, "latent_shape", 3)
        values = ({name: unnested(table.column(name), shapes) for name in self.columns},
                  {name: table.column(name).to_pylist() for name in self.kept_columns})
        self._groups[key] = values
        while len(self._groups) > self._cache_size:
            self._groups.popitem(last=False)
        return values

    def __getstate__(self) -> dict:
        # Open Parquet handles do not cross into DataLoader workers; each worker opens its own.
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def batch_sampler(self, batch_size: int, **options: Any) -> BucketBatchSampler:
        """Batches of one latent shape each; `options` as for `BucketBatchSampler`. Shuffling goes window by
        window of row groups (`shuffle_window`), so that a row group is decoded once per window, not per item."""
        window = options.get("shuffle_window", DEFAULT_SHUFFLE_WINDOW)
        if window is not None:
            self._cache_size = max(self._cache_size, 2 * window)  # see CACHED_ROW_GROUPS
        return BucketBatchSampler(self.shapes, batch_size, groups=self.row_groups(), **options)

    def row_groups(self) -> np.ndarray:
        """(N,) the Parquet row group each item is stored in, numbered across files."""
        _, group = np.unique(self.locations[:, :2], axis=0, return_inverse=True)
        return group.reshape(-1)


def _fixed(table: Any, column: str, size: int) -> np.ndarray:
    """A fixed-size-list column as an (N, size) array."""
    return table.column(column).combine_chunks().flatten().to_numpy().reshape(-1, size)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices that share a latent shape, for `DataLoader(batch_sampler=...)`.

    With `shuffle`, each epoch is a new random order seeded by (seed, epoch): call `set_epoch` each epoch, as with
    `DistributedSampler`.
    - Without `groups` (or with `shuffle_window=None`): the items of every bucket are permuted, cut into
      batches, and the order of all batches is permuted. A fully random order.
    - With `groups`, the storage unit of each item (a Parquet row group, which must be decoded whole): the
      groups are permuted and taken `shuffle_window` at a time; the items of a window are permuted per bucket
      and cut into batches (a bucket's remainder joins the next window), and the window's batches are permuted.
      A batch then mixes items of `shuffle_window` random groups, and each process decodes a group once per
      window instead of once per item: the shuffle buffer of streaming loaders, at the cost of batches drawn
      from a window rather than from the whole set.
    Under data parallelism every rank gets every `world_size`-th batch of the same global order; the batch count
    is cut to a multiple of `world_size` so that all ranks take the same number of steps. rank and world_size
    default to torch.distributed's when it is initialised.
    """

    def __init__(
        self, shapes: np.ndarray, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
        rank: int | None = None, world_size: int | None = None, groups: np.ndarray | None = None,
        shuffle_window: int | None = DEFAULT_SHUFFLE_WINDOW,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if rank is None or world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
            world_size = torch.distributed.get_world_size() if distributed else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shapes, self.batch_size, self.shuffle, self.seed = shapes, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        if shuffle_window is not None and shuffle_window < 1:
            raise ValueError(f"shuffle_window={shuffle_window} must be at least 1 (or None for a full shuffle)")
        self.groups, self.shuffle_window = groups, shuffle_window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _buckets(self) -> list[np.ndarray]:
        """Item indices of each latent shape."""
        _, inverse = np.unique(self.shapes, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        return [np.flatnonzero(inverse == bucket) for bucket in range(inverse.max() + 1 if len(inverse) else 0)]

    def __iter__(self) -> Iterator[list[int]]:
        generator = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle and self.groups is not None and self.shuffle_window is not None:
            batches = self._windowed_batches(generator)
        else:
            batches = []
            for members in self._buckets():
                if self.shuffle:
                    members = generator.permutation(members)
                batches += self._cut(members)
            if self.shuffle:
                batches = [batches[i] for i in generator.permutation(len(batches))]
        usable = len(batches) // self.world_size * self.world_size
        return iter(batches[:usable][self.rank::self.world_size])

    def _cut(self, members: np.ndarray) -> list[list[int]]:
        """Consecutive batches of `members`, the last one partial unless `drop_last`."""
        batches = [members[start:start + self.batch_size].tolist() for start in range(0, len(members), self.batch_size)]
        return batches if not (self.drop_last and batches and len(batches[-1]) < self.batch_size) else batches[:-1]

    def _windowed_batches(self, generator: np.random.Generator) -> list[list[int]]:
        """See the class doc: groups in random order, `shuffle_window` at a time, remainders carried forward."""
        _, bucket_of = np.unique(self.shapes, axis=0, return_inverse=True)
        bucket_of = bucket_of.reshape(-1)
        group_order = generator.permutation(np.unique(self.groups))
        by_group = {group: np.flatnonzero(self.groups == group) for group in group_order.tolist()}
        carried = {bucket: np.empty(0, dtype=np.int64) for bucket in np.unique(bucket_of).tolist()}
        batches = []
        for start in range(0, len(group_order), self.shuffle_window):
            window = np.concatenate([by_group[g] for g in group_order[start:start + self.shuffle_window].tolist()])
            window_batches = []
            for bucket in carried:
                members = generator.permutation(np.concatenate([carried[bucket], window[bucket_of[window] == bucket]]))
                whole = len(members) // self.batch_size * self.batch_size
                window_batches += [members[i:i + self.batch_size].tolist() for i in range(0, whole, self.batch_size)]
                carried[bucket] = members[whole:]
            batches += [window_batches[i] for i in generator.permutation(len(window_batches))]
        remainders = [members.tolist() for members in carried.values() if len(members) and not self.drop_last]
        return batches + [remainders[i] for i in generator.permutation(len(remainders))]

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        batches = sum(rounding(len(members) / self.batch_size) for members in self._buckets())
        return batches // self.world_size
