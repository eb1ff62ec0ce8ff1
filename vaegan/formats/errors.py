"""The one error type of `vaegan.formats`, and the reader whose failures it names most often."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


class FormatError(ValueError):
    """A file or folder that is not a model this package can load exactly; the message names file and keys."""


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a .safetensors file and its metadata; `FormatError` naming the file if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, dict(file.metadata() or {})
    except Exception as error:  # the Rust reader raises its own types for truncated or corrupt files
        raise FormatError(f"{path} is not a readable safetensors file ({error})") from error
