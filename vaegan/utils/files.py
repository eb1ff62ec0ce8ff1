"""Files that are never half-written: a write goes to a temporary name beside its target, then is renamed over
it, so a reader (or a killed writer's next run) sees the old content or the new one, never a mixture."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it to `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        make_readable(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def replace_folder_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside `path` with `write`, then swap it in; a replaced folder is deleted only
    after the swap, and put back if the swap itself fails."""
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    previous = temporary.with_name(temporary.name + ".old")
    try:
        write(temporary)
        if path.exists():
            os.replace(path, previous)
        os.replace(temporary, path)
    except BaseException:
        if previous.exists() and not path.exists():
            os.replace(previous, path)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def make_readable(path: Path) -> None:
    """Give a file the permissions a plain `open` would have (mkstemp makes it private to its owner, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically; returns the path.

    allow_nan=False: a stray inf or NaN fails here rather than writing a file other tools cannot parse.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    write_file_atomically(path, lambda file: file.write_text(text))
    return path


def read_json(path: Path) -> Any:
    """Parsed JSON; a `ValueError` naming the file when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from error


def as_json(data: Any) -> Any:
    """`data` as it reads back from JSON (tuples become lists), for comparing with what a file holds."""
    return json.loads(json.dumps(data))
