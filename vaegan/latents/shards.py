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

Latents are nested lists (C of h of w values), so `datasets` shows them as arrays of the right shape and its
numpy/torch formats return (C, h, w) arrays. fp16 and fp32 are stored as such. bf16 has no Arrow type: it is
stored as the uint16 bit pattern of each value (the field's metadata says "bfloat16"); `decode_values` turns it
back (numpy: `(bits.astype(np.uint32) << 16).view(np.float32)`; torch: `bits.view(torch.bfloat16)`).
Each file's schema metadata also carries the latent normalisation, so a single shard can be decoded alone.

Shards are committed in two steps, each atomic (written under a hidden temporary name, then renamed): first the
Parquet file (`ShardWriter.commit`), then its progress record (`vaegan.latents.manifest.write_record`). A
shard counts as
done only when its record exists, so a process killed at any moment leaves either a done shard or one that the
next run redoes and overwrites, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vaegan.utils.dtypes import resolve_dtype
from vaegan.utils.files import make_readable

SHARD_PATTERN = "train-*.parquet"
METADATA_KEY = b"vaegan"
FORMAT_NAME = "vaegan-latents"
# 2: the normalisation is recorded whole ("normalization": scalar, channel or patch); version 1 shards (scalar
# scaling_factor and shift_factor beside the other metadata) still read.
FORMAT_VERSION = 2

# Stored type of each latent precision; bf16 travels as its bit pattern (see the module docstring).
STORAGE_TYPES = {"fp32": pa.float32(), "fp16": pa.float16(), "bf16": pa.uint16()}
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


def schema(store: str, dtype: str, metadata: dict) -> pa.Schema:
    """The Arrow schema of a shard; `metadata` (factors, store, dtype) goes into the file's key-value metadata."""
    if store not in STORES:
        raise ValueError(f"store={store!r}; choose one of {', '.join(STORES)}")
    if dtype not in STORAGE_TYPES:
        raise ValueError(f"latent dtype {dtype!r}; choose one of {', '.join(STORAGE_TYPES)}")
    tensor = pa.list_(pa.list_(pa.list_(STORAGE_TYPES[dtype])))
    field_metadata = {b"dtype": b"bfloat16"} if dtype == "bf16" else None
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
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def encode_values(latents: torch.Tensor, dtype: str) -> np.ndarray:
    """Float latents (B, C, h, w) -> a numpy array of the storage type (bf16 as uint16 bits)."""
    stored = latents.to(resolve_dtype(dtype))
    if dtype == "bf16":
        return stored.view(torch.int16).cpu().numpy().view(np.uint16)
    return stored.cpu().numpy()


def decode_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values (any shape) -> float32."""
    if dtype == "bf16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


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
    flat = column.flatten().flatten().flatten().to_numpy(zero_copy_only=False)
    sizes = shapes.prod(axis=1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    if starts[-1] != len(flat):
        raise ValueError(f"latent values ({len(flat)}) do not match the stored shapes ({starts[-1]})")
    rows = zip(starts[:-1], sizes, shapes, strict=True)
    return [flat[start:start + size].reshape(shape) for start, size, shape in rows]


class ShardWriter:
    """The rows of one shard, written through a hidden temporary Parquet file and committed by `commit`.

    Rows are added a batch at a time and written out every `ROW_GROUP_SIZE` rows, so memory stays bounded
    however large the shard. A shard without a single good image writes no Parquet file at all (`datasets`
    cannot read a file of zero rows) but still gets its progress record, listing its errors.
    """

    def __init__(self, folder: Path, shard: int, schema: pa.Schema):
        self.folder, self.shard, self.schema = folder, shard, schema
        self.rows = 0
        self.shapes: dict[str, int] = {}
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._temporary: Path | None = None

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
            handle, name = tempfile.mkstemp(dir=self.folder, prefix=f".{shard_name(self.shard)}.", suffix=".tmp")
            os.close(handle)
            self._temporary = Path(name)
            # Latents are close to noise: dictionary encoding and compression buy little and cost decode time.
            self._writer = pq.ParquetWriter(
                self._temporary, self.schema, compression="snappy", use_dictionary=["id"]
            )
        self._writer.write_table(pa.Table.from_batches(self._pending), row_group_size=ROW_GROUP_SIZE)
        self._pending, self._pending_rows = [], 0

    def commit(self, items: int, errors: list[dict]) -> dict:
        """Rename the Parquet file into place; returns the shard's record, which `vaegan.latents.manifest` writes
        to mark the shard done."""
        if self.rows + len(errors) != items:
            self.abort()
            raise RuntimeError(
                f"shard {self.shard}: {self.rows} rows + {len(errors)} errors != {items} items; not committed"
            )
        self._flush()
        path = self.folder / shard_name(self.shard)
        if self._writer is not None:
            self._writer.close()
            make_readable(self._temporary)
            os.replace(self._temporary, path)
        else:
            path.unlink(missing_ok=True)  # an earlier, different attempt must not survive as a shard
        record = {
            "shard": self.shard, "items": items, "rows": self.rows, "errors": errors,
            "file": path.name if self.rows else None, "bytes": path.stat().st_size if self.rows else 0,
            "shapes": self.shapes,
        }
        return record

    def abort(self) -> None:
        """Drop the temporary file (after an error in this process; a killed process leaves it behind)."""
        if self._writer is not None:
            self._writer.close()
        if self._temporary is not None:
            self._temporary.unlink(missing_ok=True)


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The shard files of an output folder (sorted), or the one Parquet file given."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such latent folder or shard file")
    files = sorted(path.glob(SHARD_PATTERN))
    if not files:
        raise FileNotFoundError(f"{path}: no latent shards ({SHARD_PATTERN}) in this folder")
    return files


def file_metadata(path: Path) -> dict:
    """The vaegan metadata of a shard file (store, dtype, factors); `ValueError` naming the file if absent."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from error
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path}: a Parquet file without vaegan latent metadata (not written by vaegan encode)")
    return json.loads(metadata[METADATA_KEY])


