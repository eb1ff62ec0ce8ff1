"""Training checkpoints on disk: written whole or not at all, refused by name when they are not whole, and read
for what they hold (the autoencoder's weights, what it was trained on). This module is the one that knows how a
vaegan training checkpoint (a Lightning checkpoint) is laid out; it does not import Lightning.

A checkpoint is written to a temporary file beside its target, flushed to disk, then renamed over it: a run
killed while writing (`kill -9`, a preempted machine) leaves the previous checkpoint as it was, and at worst a
hidden `.NAME.*.tmp` file that the next write of that checkpoint removes; a write that fails (a full disk)
removes its temporary file and raises an `OSError` that says so.

torch writes a checkpoint as a zip archive whose directory comes last, so a file that was cut short has none:
that is how a truncated file is told from a whole one without reading it all.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from vaegan.utils.files import write_file_atomically


class CheckpointError(ValueError):
    """A file given as a checkpoint that is not a whole, readable one: the message names it."""


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """`torch.save` that leaves `path` either as it was or holding the whole new checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # from a writer that was killed mid-write
        leftover.unlink(missing_ok=True)

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            # On disk before the rename: otherwise a machine that loses power could keep the new name over
            # data that never reached the disk.
            os.fsync(file.fileno())

    try:
        write_file_atomically(path, write)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a failed write as a RuntimeError
        raise OSError(
            f"could not write the checkpoint {path} ({' '.join(str(error).split())}); is the disk full? "
            f"{path.name} is as it was before this write"
        ) from error


def check_complete(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` naming `path` unless it is a whole checkpoint file (a zip archive with its
    directory); `FileNotFoundError` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a complete checkpoint ({path.stat().st_size:,} bytes without the zip directory that "
            "torch writes last): it was cut short while being written (a crash, a full disk) or is not a "
            "checkpoint at all. Resume from an earlier checkpoint; vaegan renames its checkpoints into place only "
            "once they are whole, so the last.ckpt of a killed run is the previous, whole one"
        )


def unreadable(path: str | os.PathLike, error: Exception) -> CheckpointError:
    """The error for a whole checkpoint file that `torch.load` still cannot read (damaged, or not a checkpoint)."""
    return CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {load_error_reason(error)})")


def load_error_reason(error: Exception) -> str:
    """The informative line of a reader's error (torch.load's, safetensors', numpy's), without torch's advice to
    drop weights_only: what a one-line message about an unreadable file can quote."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds pickled objects besides tensors and plain containers, which vaegan never unpickles"
    detail = str(error).split("WeightsUnpickler error:")[-1].strip()
    return detail.split(". ")[0].splitlines()[0] if detail else type(error).__name__


# Where a vaegan training checkpoint keeps what export and `vaegan.load` read: Lightning's module state and
# datamodule arguments, and our architecture config (`vaegan.formats.naming.METADATA_KEY` names the latter).
STATE_KEY = "state_dict"
DATA_KEY = "datamodule_hyper_parameters"
# The module's state: the trained autoencoder and its EMA.
WEIGHT_PREFIXES = {"model": "vae.", "ema": "ema."}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A whole checkpoint's contents, tensors memory-mapped, nothing unpickled but plain containers."""
    check_complete(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # zip, pickle and unpickler errors of a damaged file come in many types
        raise unreadable(path, error) from error


def training_weights(checkpoint: dict[str, Any], path: str | os.PathLike, weights: str | None) -> dict[str, Any]:
    """The autoencoder's tensors in a vaegan training checkpoint: its EMA when it kept one, unless `weights`
    ("ema" or "model") says which."""
    state = checkpoint.get(STATE_KEY, {})
    has_ema = any(key.startswith(WEIGHT_PREFIXES["ema"]) for key in state)
    weights = weights or ("ema" if has_ema else "model")
    if weights not in WEIGHT_PREFIXES:
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if weights == "ema" and not has_ema:
        raise ValueError(f"{path} was trained without an EMA (ema_decay: null); use weights='model'")
    prefix = WEIGHT_PREFIXES[weights]
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def trained_on(checkpoint: dict[str, Any]) -> str | None:
    """The image source a vaegan training checkpoint was trained on (None: the demo photos)."""
    return (checkpoint.get(DATA_KEY) or {}).get("source")
