"""Raw samples from the files large image datasets ship as: WebDataset tars and Parquet files, at any URL.

A `RawSample` is an image file's bytes plus a few side columns as text; decoding is left to
`vaegan.images.reading.load_image`, so a corrupt image is one sample's `ImageError`, not a broken shard. A shard
file that stops early (an interrupted upload, a corrupt header) yields every sample known to be complete before
the break and then raises `ShardReadError`, so no sample is lost silently and none is made up from half a file.

Every file is opened through fsspec, so plain paths, `file://`, `memory://`, `s3://`, `gs://` and `hf://` all work;
tars are streamed front to back once, never extracted.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

# What a broken archive raises, as opposed to a failing connection (OSError, the store's client errors), which
# must stop the run so that the rerun reads the shard again rather than record it as cut short for good.
CORRUPT_ARCHIVE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)

# What WebDataset shards usually hold; an image member is found by its extension, lowercased.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class RawSample:
    """One sample of a shard file, its image still encoded."""

    index: int  # position within its file (0, 1, 2...), counting samples without an image too
    id: str  # tar: the WebDataset key; Parquet: the id column's value, else f"{file stem}/{row}"
    name: str  # for error messages: f"{url}:{member name}" for tars, f"{url}[{row}]" for Parquet
    data: bytes | None  # the image file's bytes; None when the sample has no image (see `missing`)
    extras: dict[str, str]  # the kept side columns, as text
    missing: str | None = None  # why there is no image


class ShardReadError(Exception):
    """A shard file that cannot be read to its end (a truncated tar, a broken Parquet file): the message names the
    url and how many samples were read before it broke."""


# ---------------------------------------------------------------------------------------------------- listing

# A brace group with no braces inside: nested groups are refused rather than half-expanded.
_BRACE_GROUP = re.compile(r"\{([^{}]*)\}")
_NUMERIC_RANGE = re.compile(r"(\d+)\.\.(\d+)")
# fsspec's own test for a glob pattern.
_GLOB_CHARACTERS = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion as WebDataset uses it for shard lists.

    `{00000..01023}` counts with the zero padding of the first bound, `{a,b,c}` lists alternatives, and several
    groups expand as a product, the first group varying slowest: `shards/{000..002}.tar` gives `shards/000.tar`,
    `shards/001.tar`, `shards/002.tar`. A group that is neither (`{5..1}`, `{a}`), nested or unbalanced braces
    raise `ValueError`.
    """
    parts: list[list[str]] = []  # literal text and groups' alternatives, alternating
    position = 0
    for match in _BRACE_GROUP.finditer(pattern):
        parts.append([_literal(pattern[position:match.start()], pattern)])
        parts.append(_alternatives(match.group(1), pattern))
        position = match.end()
    parts.append([_literal(pattern[position:], pattern)])
    return ["".join(choice) for choice in itertools.product(*parts)]


def _literal(text: str, pattern: str) -> str:
    if "{" in text or "}" in text:
        raise ValueError(f"{pattern!r}: unbalanced or nested braces")
    return text


def _alternatives(group: str, pattern: str) -> list[str]:
    numeric = _NUMERIC_RANGE.fullmatch(group)
    if numeric:
        first, last = numeric.groups()
        if int(first) > int(last):
            raise ValueError(f"{pattern!r}: the range {{{group}}} counts down; write it first..last, smallest first")
        return [str(number).zfill(len(first)) for number in range(int(first), int(last) + 1)]
    if "," in group:
        return group.split(",")
    raise ValueError(f"{pattern!r}: {{{group}}} is neither a numeric range (000..099) nor a list (a,b,c)")


def list_shard_files(spec: str, suffix: str) -> list[str]:
    """The shard files a spec names, as URLs (plain local paths stay plain paths, made absolute).

    The spec is a brace pattern (`shards/{00000..00127}.tar`: every file it expands to must exist; kept in
    expansion order), a glob (`data/*.parquet`: every file matching, sorted), a single file, or a folder or
    object-store prefix (every file under it whose name ends in `suffix`, recursively, sorted).
    """
    if "{" in spec or "}" in spec:
        files = []
        for url in expand_braces(spec):
            fs, path = url_to_fs(url)
            if not fs.isfile(path):
                raise FileNotFoundError(f"{spec}: {url} does not exist")
            files.append(_as_url(fs, path, spec))
        return files
    fs, path = url_to_fs(spec)
    if _GLOB_CHARACTERS.search(path):
        # detail=True returns each match's type with the listing, instead of one request per match
        paths = sorted(name for name, info in fs.glob(path, detail=True).items() if info["type"] == "file")
    elif fs.isfile(path):
        paths = [path]
    else:
        paths = sorted(name for name in fs.find(path) if name.endswith(suffix))
    if not paths:
        wanted = "files" if _GLOB_CHARACTERS.search(path) else f"files ending in {suffix!r}"
        raise FileNotFoundError(f"{spec}: no {wanted} found")
    return [_as_url(fs, name, spec) for name in paths]


def _as_url(fs: fsspec.AbstractFileSystem, path: str, spec: str) -> str:
    """A listed path with the spec's protocol put back, so that it opens on the same file system."""
    return fs.unstrip_protocol(path) if "://" in spec else path


def file_fingerprint(urls: list[str]) -> str:
    """A sha256 hex digest of each file's url and size, in order: it changes when a file is added, removed,
    renamed or rewritten with another size (not when rewritten with the same size: that would need the bytes)."""
    digest = hashlib.sha256()
    for url in urls:
        fs, path = url_to_fs(url)
        digest.update(f"{url}\t{fs.info(path)['size']}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------- tars

# WebDataset's own split of a member name: the key runs to the first dot of the basename, the extension is the
# rest ("dir/abc.def.jpg" -> "dir/abc", "def.jpg"). Names without a dot in the basename, or starting with one,
# belong to no sample.
_KEY_AND_EXTENSION = re.compile(r"((?:.*/)?[^.]+)\.([^/]*)")


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers on its `_ShardTar` why the last header could not be read.

    tarfile stops quietly at a missing, truncated or corrupt header after the first member, exactly as at the
    end-of-archive marker; for a shard that means samples lost without a word, so the reason is kept to check.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as error:
            tar.header_error = error
            raise


class _ShardTar(tarfile.TarFile):
    """A tar that knows whether it ended at its end-of-archive marker (a block of zeros) or broke off."""

    tarinfo = _EndRecordingTarInfo
    header_error: tarfile.HeaderError | None = None

    def next_file(self) -> tarfile.TarInfo | None:
        """The next regular file member; None at a proper end; `tarfile.ReadError` where the archive breaks off."""
        while (info := self.next()) is not None:
            # Streamed archives remember every member they pass; a shard of many samples has no use for that.
            self.members.clear()
            if info.isfile():
                return info
        if isinstance(self.header_error, tarfile.EOFHeaderError):
            return None
        if self.header_error is None or isinstance(self.header_error, tarfile.EmptyHeaderError):
            raise tarfile.ReadError("the file ends without the end-of-archive marker")
        raise tarfile.ReadError(f"a member header cannot be read ({self.header_error})")


def tar_samples(
    url: str, image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS, keep: tuple[str, ...] = ()
) -> Iterator[RawSample]:
    """The samples of one WebDataset tar, streamed front to back once (any compression tarfile detects).

    A sample is a run of consecutive members with the same key. Its image is the member whose lowercased extension
    comes first in `image_extensions`; a sample without one is still yielded, with `data` None and `missing` set.
    `keep` names extensions (`txt`, `json`, `cls`) whose bytes become `extras[extension]` as UTF-8 text; a sample
    without one simply lacks that entry. Where the archive breaks off, every sample known to be complete is
    yielded, then `ShardReadError`: a sample is complete once the header of the next sample's first member has been
    read, so a break at or inside that header also drops the sample before it, which may have lost members.
    """
    wanted = [extension.lower() for extension in (*image_extensions, *keep)]
    index = 0
    with fsspec.open(url, "rb") as file:
        # Everything in this block is reading the archive: any error in it means the shard is broken here.
        try:
            with _ShardTar.open(fileobj=file, mode="r|*") as tar:
                key, members = None, {}  # the sample being read: its key, and its wanted members' (name, bytes)
                while (info := tar.next_file()) is not None:
                    split = _KEY_AND_EXTENSION.fullmatch(info.name)
                    if split is None:
                        continue
                    member_key, extension = split.group(1), split.group(2).lower()
                    # A new key's header is read only after the members before it were read to their end, so
                    # the previous sample is known to be complete here, and only here.
                    if member_key != key:
                        if key is not None:
                            yield _tar_sample(url, index, key, members, image_extensions, keep)
                            index += 1
                        key, members = member_key, {}
                    if extension in wanted and extension not in members:  # a repeated extension: the first wins
                        members[extension] = (info.name, tar.extractfile(info).read())
                if key is not None:
                    yield _tar_sample(url, index, key, members, image_extensions, keep)
        except CORRUPT_ARCHIVE as error:
            raise ShardReadError(
                f"{url}: cannot read the tar to its end ({type(error).__name__}: {error}); "
                f"{_samples(index)} read before it broke"
            ) from error


def _tar_sample(
    url: str, index: int, key: str, members: dict[str, tuple[str, bytes]], image_extensions: tuple[str, ...],
    keep: tuple[str, ...],
) -> RawSample:
    # Captions are kept even with a stray invalid byte: it shows as U+FFFD instead of stopping the whole shard.
    extras = {name: members[name.lower()][1].decode("utf-8", errors="replace") for name in keep
              if name.lower() in members}
    image = next((extension.lower() for extension in image_extensions if extension.lower() in members), None)
    if image is None:
        missing = f"no image member ({', '.join(image_extensions)})"
        return RawSample(index, key, f"{url}:{key}", None, extras, missing)
    name, data = members[image]
    return RawSample(index, key, f"{url}:{name}", data, extras)


# ---------------------------------------------------------------------------------------------------- Parquet


def parquet_samples(
    url: str, image_column: str = "image", id_column: str | None = None, keep: tuple[str, ...] = (),
    batch_size: int = 64,
) -> Iterator[RawSample]:
    """The rows of one Parquet file, read a record batch at a time, only the columns needed.

    The image column holds the encoded file as binary, or as a struct with a `bytes` field (the Hugging Face
    `Image` feature, `{"bytes", "path"}`); a null image gives `data` None and `missing` set. `id_column` names the
    column of ids (else a row's id is `{file stem}/{row}`); `keep` names columns to carry along as text, JSON for
    values that are not strings (a null is left out). A missing column or an image column of another type raises
    `ValueError`; a file pyarrow cannot read, `ShardReadError` after the rows read before it broke.
    """
    with fsspec.open(url, "rb") as file:
        try:
            parquet = pq.ParquetFile(file)
        except Exception as error:
            raise _parquet_error(url, error, 0) from error
        columns = list(dict.fromkeys(name for name in (image_column, id_column, *keep) if name is not None))
        _check_columns(url, parquet.schema_arrow, columns, image_column)
        stem = PurePosixPath(url).stem
        batches = parquet.iter_batches(batch_size=batch_size, columns=columns)
        row = 0
        while True:
            try:
                batch = next(batches, None)
            except Exception as error:
                raise _parquet_error(url, error, row) from error
            if batch is None:
                return
            values = {name: batch.column(name).to_pylist() for name in columns}
            for i, image in enumerate(values[image_column]):
                if id_column is None:
                    sample_id = f"{stem}/{row}"
                elif values[id_column][i] is None:
                    raise ValueError(f"{url}[{row}]: null id in column {id_column!r}")
                else:
                    sample_id = str(values[id_column][i])
                extras = {name: _as_text(values[name][i]) for name in keep if values[name][i] is not None}
                data, missing = _image_bytes(image)
                yield RawSample(row, sample_id, f"{url}[{row}]", data, extras, missing)
                row += 1


def _check_columns(url: str, schema: pa.Schema, columns: list[str], image_column: str) -> None:
    for name in columns:
        if name not in schema.names:
            raise ValueError(f"{url}: no column {name!r}; its columns are {', '.join(schema.names)}")
    kind = schema.field(image_column).type
    is_binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    is_image_struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
    if not (is_binary or is_image_struct):
        raise ValueError(
            f"{url}: column {image_column!r} is {kind}, not image bytes (binary, or a struct with a 'bytes' field)"
        )


def _image_bytes(value: bytes | dict | None) -> tuple[bytes | None, str | None]:
    """An image cell's bytes, or None and why there are none."""
    if isinstance(value, dict):  # the Hugging Face `Image` feature
        if value.get("bytes") is None and value.get("path"):
            return None, f"image not embedded, only its path: {value['path']}"
        value = value.get("bytes")
    return (value, None) if value is not None else (None, "null image")


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    # default=str: timestamps and decimals come back from Arrow as Python objects json cannot write itself
    return json.dumps(value, ensure_ascii=False, default=str)


def _parquet_error(url: str, error: Exception, rows: int) -> ShardReadError:
    return ShardReadError(
        f"{url}: cannot read the Parquet file ({type(error).__name__}: {error}); {_samples(rows)} read before it "
        "broke"
    )


def _samples(count: int) -> str:
    return "1 sample was" if count == 1 else f"{count} samples were"
