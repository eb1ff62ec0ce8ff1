"""Where latent shards live: a local folder or an object-store prefix (`s3://`, `gs://`, `hf://`, `file://`), reached
through fsspec. Credentials come from each store's usual environment and config files (for S3: AWS_* variables,
~/.aws, an endpoint in AWS_ENDPOINT_URL), never from options.

An object store has no atomic rename, so shards are committed the same way everywhere (see
`vaegan.latents.shards` for the steps): written under a unique hidden name, committed by a record, then
published under their final name. Everything small (the manifest, records) is written in one piece: a rename
on a local disk, a single PUT on a store, where an object appears whole or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from vaegan.utils.files import claim_json, json_text, read_json, write_file_atomically


class Store:
    """A folder, local or remote, addressed by names relative to it ("manifest.json", ".progress/shard-0.json")."""

    def __init__(self, url: str | os.PathLike):
        self.url = str(url).rstrip("/") or str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") or root
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __str__(self) -> str:
        return self.url

    def path(self, name: str) -> str:
        """The filesystem path of `name` (without the protocol, as `self.fs` takes it)."""
        return f"{self.root}/{name}"

    def url_of(self, name: str) -> str:
        """`name` as the user would write it, for messages."""
        return f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        self._forget_listings()
        return self.fs.exists(self.path(name))

    def size(self, name: str) -> int:
        return int(self.fs.info(self.path(name))["size"])

    def make(self) -> None:
        """Create the folder (a no-op on object stores, where prefixes need no creating)."""
        self.fs.makedirs(self.root, exist_ok=True)

    def names(self, pattern: str) -> list[str]:
        """The names matching a glob `pattern` (e.g. "train-*.parquet"), sorted."""
        prefix = self.root + "/"
        self._forget_listings()
        return sorted(path.removeprefix(prefix) for path in self.fs.glob(self.path(pattern)))

    def entries(self) -> list[str]:
        """The visible names directly in the folder (not starting with "."), sorted; [] when it does not exist."""
        self._forget_listings()
        if not self.fs.exists(self.root):
            return []
        names = (path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False))
        return sorted(name for name in names if not name.startswith("."))

    def _forget_listings(self) -> None:
        """Object-store filesystems cache listings; other processes write here, so every question is asked anew."""
        if not self.is_local:
            self.fs.invalidate_cache()

    def read_json(self, name: str) -> Any:
        """Parsed JSON; a `ValueError` naming the file when it is missing or not JSON."""
        if self.is_local:
            return read_json(Path(self.path(name)))
        try:
            return json.loads(self.fs.cat_file(self.path(name)))
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.url_of(name)}: unreadable ({error})") from error

    def write_text(self, name: str, text: str) -> None:
        """Write a file in one piece (see the module docstring)."""
        if self.is_local:
            path = Path(self.path(name))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(path, lambda file: file.write_text(text))
            return
        self.fs.pipe_file(self.path(name), text.encode())

    def write_json(self, name: str, data: Any) -> None:
        """Write JSON in one piece; NaN and infinities are refused."""
        self.write_text(name, json_text(data))

    def claim_json(self, name: str, record: dict) -> dict:
        """Write `record` unless `name` exists; return what it holds. Of several writers exactly one wins: a
        hard link locally, a conditional PUT (If-None-Match) on stores that have one (S3 does)."""
        if self.is_local:
            return claim_json(Path(self.path(name)), record)
        if not self.exists(name):
            text = json_text(record)
            try:
                with self.fs.open(self.path(name), "xb") as file:
                    file.write(text.encode())
            except FileExistsError:
                pass
            except (NotImplementedError, ValueError):  # no exclusive create: last writer wins, same settings
                self.write_text(name, text)
        return self.read_json(name)

    def open_for_writing(self, name: str) -> IO[bytes]:
        """A new file (its folder created locally); local files get the user's umask, as with `open`."""
        if self.is_local:
            Path(self.path(name)).parent.mkdir(parents=True, exist_ok=True)
        return self.fs.open(self.path(name), "wb")

    def open_for_reading(self, name: str) -> IO[bytes] | str:
        """What pyarrow opens: the path itself locally (memory-mapped, fastest), else a seekable file object."""
        return self.path(name) if self.is_local else self.fs.open(self.path(name), "rb")

    def publish(self, staged: str, final: str) -> None:
        """Give the file `staged` its final name, replacing any file there. Safe to repeat or to race: when
        `staged` is gone and `final` exists, someone else published it."""
        try:
            if self.is_local:
                os.replace(self.path(staged), self.path(final))
            else:
                self.fs.copy(self.path(staged), self.path(final))
                self.fs.rm(self.path(staged))
        except FileNotFoundError:
            if not self.exists(final):
                raise

    def remove(self, name: str) -> None:
        """Delete `name` if it exists."""
        try:
            self.fs.rm(self.path(name))
        except FileNotFoundError:
            pass
