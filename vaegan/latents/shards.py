"""The latent shard format: Parquet files that plain `datasets` reads (`vaegan.latents.manifest` keeps the books beside
them: manifest.json, errors.jsonl, .progress/).

    OUT/train-000000.parquet ...       one file per shard holding at least one encoded image

Shard files are named `train-*` because `datasets.load_dataset("parquet", data_dir=OUT)` then takes exactly those
as the train split: with any other name it would also try to read manifest.json and errors.jsonl as Parquet and
fail. Hidden files and folders (temporary files, `.progress/`) are ignored by `datasets`.

Columns, one row per image:

    id                  string        relative path (folder), row index or --id-column value (`datasets`),
                                      "SHARD/ROW" (stream)
    index               int64         position in the source: in the sorted file list or the dataset; for a
                                      stream, the row within its source shard
    mean, logvar        (C, h, w)     the posterior in the diffusion model's latent space (store="posterior"):
                                      mean = (mu - shift) * scale, logvar = log sigma^2 + 2 log scale, so a
                                      training sample is mean + exp(logvar / 2) * randn
    latent              (C, h, w)     a normalised posterior mean (store="mean") or sample (store="sample")
    latent_shape        int32[3]      (C, h, w)
    height, width       int32         pixels of the image that was encoded (its bucket)
    source_height, source_width  int32  the source image's size (after EXIF rotation)
    crop_box            float32[4]    (left, top, right, bottom): the encoded region, in source pixels
    (kept columns)      string        side columns of tars and Parquet sources, as text (`keep_columns`)

Latents are nested lists (C of h of w values), so `datasets` shows them as arrays of the right shape and its
numpy/torch formats return (C, h, w) arrays. fp16 and fp32 are stored as such. bf16 has no Arrow type: it is
stored as the uint16 bit pattern of each value (the field's metadata says "bfloat16"); `decode_values` turns it
back (numpy: `(bits.astype(np.uint32) << 16).view(np.float32)`; torch: `bits.view(torch.bfloat16)`). uint8
codes are each row's C*h*w bytes (Parquet would keep 8-bit integers in 32 bits), decoded as low + q * step per
channel (`vaegan.latents.quantization`; numpy: `np.frombuffer(row, np.uint8).reshape(latent_shape)`). Each
file's schema metadata also carries the latent normalisation and any quantisation maps, so a single shard can
be decoded alone.

Shards are committed in three steps, the same on a local disk and on an object store
(`vaegan.latents.store`), which has no atomic rename:
  1. `ShardWriter` writes the Parquet file under a unique hidden name, `.staging/train-000003.parquet.<token>.tmp`;
  2. its progress record (`vaegan.latents.manifest.commit_shard`) names that file: from here the shard counts
     as done, and a rerun skips it;
  3. the file is published under its final name, `train-000003.parquet` (a rename, or a copy then a delete).
A killed run leaves a shard uncommitted (redone and overwritten by the next run, its staged file deleted once
every shard is done) or committed and perhaps not yet published (the next run, or whichever process finishes
the folder, publishes it). Only committed files ever carry a `train-*` name, so `datasets` never reads an
uncommitted one, and an item has at most one readable copy. `LatentDataset` reads what the records name.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vaegan.latents.quantization import ChannelAffine
from vaegan.latents.store import Store
from vaegan.utils.dtypes import resolve_dtype

SHARD_PATTERN = "train-*.parquet"
# Hidden, so that neither `datasets` nor a `train-*` glob ever sees a shard that is not committed yet.
STAGING_DIR = ".staging"
METADATA_KEY = b"vaegan"
FORMAT_NAME = "vaegan-latents"
# 2: the normalisation is recorded whole ("normalization": scalar, channel or patch); version 1 shards (scalar
# scaling_factor and shift_factor beside the other metadata) still read.
FORMAT_VERSION = 2

# Stored type of each latent precision; bf16 travels as its bit pattern (see the module docstring).
STORAGE_TYPES = {"fp32": pa.float32(), "fp16": pa.float16(), "bf16": pa.uint16(), "uint8": pa.uint8()}
STORES = ("posterior", "mean", "sample")
# 1000 images per shard: at 256^2 with an f8 VAE a posterior shard is ~16 MB in fp16, at 1024^2 ~256 MB; a kill
# loses at most one shard of work per worker, and a million images make a thousand files.
DEFAULT_SHARD_SIZE = 1000
# Rows per Parquet row group: random access (LatentDataset) decodes a whole group to read one row, so groups are
# kept small; 64 rows of 4x64x64 fp16 posteriors are 4 MB.
ROW_GROUP_SIZE = 64

def shard_name(shard: int) -> str:
    return f"train-{shard:06d}.parquet"


def tensor_columns(store: str) -> tuple[str, ...]:
    """Names of the latent columns for a way of storing the posterior."""
    return ("mean", "logvar") if store == "posterior" else ("latent",)


def schema(store: str, dtype: str, metadata: dict, kept: tuple[str, ...] = ()) -> pa.Schema:
    """The Arrow schema of a shard; `metadata` (factors, store, dtype) goes into the file's key-value metadata;
    `kept` side columns follow as nullable strings."""
    if store not in STORES:
        raise ValueError(f"store={store!r}; choose one of {', '.join(STORES)}")
    if dtype not in STORAGE_TYPES:
        raise ValueError(f"latent dtype {dtype!r}; choose one of {', '.join(STORAGE_TYPES)}")
    tensor = pa.binary() if dtype == "uint8" else pa.list_(pa.list_(pa.list_(STORAGE_TYPES[dtype])))
    field_metadata = {"bf16": {b"dtype": b"bfloat16"}, "uint8": {b"dtype": b"uint8 codes, C*h*w bytes"}}.get(dtype)
    fields = [pa.field("id", pa.string()), pa.field("index", pa.int64())]
    fields += [pa.field(name, tensor, metadata=field_metadata) for name in tensor_columns(store)]
    fields += [
        pa.field("latent_shape", pa.list_(pa.int32(), 3)),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("source_height", pa.int32()),
        pa.field("source_width", pa.int32()),
        pa.field("crop_box", pa.list_(pa.float32(), 4)),
    ]
    clashing = sorted(set(kept) & {field.name for field in fields} | set(kept) & {"mean", "logvar", "latent"})
    if clashing:
        raise ValueError(f"--keep_columns {' '.join(clashing)}: the shards have columns of that name already")
    fields += [pa.field(name, pa.string()) for name in kept]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def encode_values(latents: torch.Tensor, dtype: str) -> np.ndarray:
    """Float latents (B, C, h, w) -> a numpy array of the storage type (bf16 as uint16 bits); uint8 latents come
    quantised already (`vaegan.latents.quantization`)."""
    if dtype == "uint8":
        return latents.cpu().numpy()
    stored = latents.to(resolve_dtype(dtype))
    if dtype == "bf16":
        return stored.view(torch.int16).cpu().numpy().view(np.uint16)
    return stored.cpu().numpy()


def decode_values(values: np.ndarray, dtype: str, affine: ChannelAffine | None = None) -> np.ndarray:
    """Stored values -> float32; uint8 codes (C, h, w) through their column's per-channel `affine` map."""
    if dtype == "uint8":
        if affine is None:
            raise ValueError("uint8 latents decode through their quantisation map, which this shard lacks")
        return affine.dequantize(values)
    if dtype == "bf16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def tensor_column(values: np.ndarray, dtype: str) -> pa.Array:
    """Stored (B, C, h, w) values as a shard's column: nested lists, or for uint8 codes each row's bytes (Parquet
    keeps 8-bit integers in 32 bits, which would leave them hardly smaller than fp16 once compressed)."""
    if dtype == "uint8":
        return pa.array([row.tobytes() for row in values], type=pa.binary())
    return nested(values, STORAGE_TYPES[dtype])


def nested(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A (B, C, h, w) array -> B nested lists (C of h of w), built from offsets without Python loops."""
    batch, channels, height, width = values.shape
    flat = pa.array(values.reshape(-1), type=value_type)
    rows = pa.ListArray.from_arrays(np.arange(0, len(flat) + 1, width, dtype=np.int32), flat)
    planes = pa.ListArray.from_arrays(np.arange(0, len(rows) + 1, height, dtype=np.int32), rows)
    return pa.ListArray.from_arrays(np.arange(0, len(planes) + 1, channels, dtype=np.int32), planes)


def unnested(column: pa.Array | pa.ChunkedArray, shapes: np.ndarray) -> list[np.ndarray]:
    """Nested-list latents of rows with shapes (N, 3) -> one stored-type numpy array (C, h, w) per row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_binary(column.type):  # uint8 codes
        return [np.frombuffer(row, np.uint8).reshape(shape) for row, shape in zip(column.to_pylist(), shapes,
                                                                                   strict=True)]
    flat = column.flatten().flatten().flatten().to_numpy(zero_copy_only=False)
    sizes = shapes.prod(axis=1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    if starts[-1] != len(flat):
        raise ValueError(f"latent values ({len(flat)}) do not match the stored shapes ({starts[-1]})")
    rows = zip(starts[:-1], sizes, shapes, strict=True)
    return [flat[start:start + size].reshape(shape) for start, size, shape in rows]


class ShardWriter:
    """The rows of one shard, written to a unique hidden file in `store` and handed over to be committed by
    `commit` (step 1 of the module docstring's protocol).

    Rows are added a batch at a time and written out every `ROW_GROUP_SIZE` rows, so memory stays bounded
    however large the shard. A shard without a single good image writes no Parquet file at all (`datasets`
    cannot read a file of zero rows) but still gets its progress record, listing its errors.
    """

    def __init__(self, store: Store, shard: int, schema: pa.Schema):
        self.store, self.shard, self.schema = store, shard, schema
        self.rows = 0
        self.shapes: dict[str, int] = {}
        self.staged: str | None = None  # the hidden file's name, once the first rows are written
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._file: Any = None
        self._writer: pq.ParquetWriter | None = None

    def add(self, columns: dict[str, Any]) -> None:
        """Append rows: a dict of equally long columns, in the schema's names (latents as `nested` arrays)."""
        batch = pa.RecordBatch.from_pydict(columns, schema=self.schema)
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self.rows += batch.num_rows
        for shape in columns["latent_shape"]:
            key = "x".join(str(int(side)) for side in shape)
            self.shapes[key] = self.shapes.get(key, 0) + 1
        if self._pending_rows >= ROW_GROUP_SIZE:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        if self._writer is None:
            self.staged = f"{STAGING_DIR}/{shard_name(self.shard)}.{uuid.uuid4().hex}.tmp"
            self._file = self.store.open_for_writing(self.staged)
            # Latents are close to noise: dictionary encoding and compression buy little and cost decode time.
            self._writer = pq.ParquetWriter(self._file, self.schema, compression="snappy", use_dictionary=["id"])
        self._writer.write_table(pa.Table.from_batches(self._pending), row_group_size=ROW_GROUP_SIZE)
        self._pending, self._pending_rows = [], 0

    def commit(self, items: int, errors: list[dict]) -> dict:
        """Finish the hidden file; returns the shard's record, which `vaegan.latents.manifest.commit_shard`
        writes (the commit) before publishing the file."""
        if self.rows + len(errors) != items:
            self.abort()
            raise RuntimeError(
                f"shard {self.shard}: {self.rows} rows + {len(errors)} errors != {items} items; not committed"
            )
        self._flush()
        self._close()
        return {
            "shard": self.shard, "items": items, "rows": self.rows, "errors": errors,
            "file": shard_name(self.shard) if self.rows else None, "staged": self.staged,
            "bytes": self.store.size(self.staged) if self.rows else 0, "shapes": self.shapes,
        }

    def abort(self) -> None:
        """Drop the hidden file (after an error in this process; a killed process leaves it behind)."""
        self._close()
        if self.staged is not None:
            self.store.remove(self.staged)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = None


def file_metadata(store: Store, name: str) -> dict:
    """The vaegan metadata of a shard file (store, dtype, factors); `ValueError` naming the file if absent."""
    try:
        metadata = pq.read_schema(store.open_for_reading(name)).metadata or {}
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"{store.url_of(name)}: not a readable Parquet file ({error})") from error
    if METADATA_KEY not in metadata:
        raise ValueError(f"{store.url_of(name)}: a Parquet file without vaegan latent metadata (not written by "
                         "vaegan encode)")
    return json.loads(metadata[METADATA_KEY])
