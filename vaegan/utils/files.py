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


def check_replaceable(path: Path, ours: Callable[[Path], bool], format: str, holder: str) -> None:
    """Refuse to write a `format` folder over a file, or over a folder holding entries that `ours` does not
    recognise as `holder`'s: `replace_folder_atomically` would delete them."""
    if path.is_file():
        raise FileExistsError(f"{path} is a file; the {format} format writes a folder")
    if path.is_dir():
        foreign = sorted(entry.name for entry in path.iterdir() if not ours(entry))
        if foreign:
            raise FileExistsError(f"refusing to replace {path}: it holds files {holder} does not "
                                  f"({', '.join(foreign)})")


def replace_folder_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside `path` with `write`, then swap it in; a replaced folder is deleted only
    after the swap, and put back if the swap itself fails."""
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    previous = temporary.with_name(temporary.name + ".old")
    try:
        write(temporary)
        for entry in (temporary, *temporary.rglob("*")):
            make_readable(entry)
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
    """Give a file or folder the permissions a plain `open` or `mkdir` would have under the user's umask.

    mkstemp and mkdtemp make theirs private to their owner (0600, 0700), and so do some writers (safetensors'
    `save_file`): renamed into place as they are, an exported VAE would be unreadable to anyone else.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: Path, data: Any) -> Path:
    """Write JSON (`json_text`) atomically; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json_text(data)
    write_file_atomically(path, lambda file: file.write_text(text))
    return path


def json_text(data: Any) -> str:
    """What `write_json` writes; allow_nan=False: a stray inf or NaN fails here rather than writing a file other
    tools cannot parse."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def read_json(path: Path) -> Any:
    """Parsed JSON; a `ValueError` naming the file when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from error


def claim_json(path: Path, record: dict) -> dict:
    """Write `record` to `path` unless the file exists; return what the file holds (the record, or what an earlier
    run wrote there). Of several processes claiming at once exactly one writes: the file is linked into place,
    which fails when the name is taken."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_json(temporary, record)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
    return read_json(path)


def differences(existing: dict, wanted: dict, keys: tuple[str, ...] | None = None) -> str:
    """The `keys` (dotted paths; default: every top-level key of either) whose values differ between a recorded
    `existing` and a `wanted` record, as "key: old -> new" pairs joined by "; " (empty when they agree)."""
    wanted = as_json(wanted)
    keys = keys if keys is not None else tuple(sorted(existing.keys() | wanted.keys()))
    pairs = ((key, _lookup(existing, key), _lookup(wanted, key)) for key in keys)
    return "; ".join(f"{key}: {json.dumps(old)} -> {json.dumps(new)}" for key, old, new in pairs if old != new)


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def as_json(data: Any) -> Any:
    """`data` as it reads back from JSON (tuples become lists), for comparing with what a file holds."""
    return json.loads(json.dumps(data))
