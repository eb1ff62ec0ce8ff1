"""Where pretrained networks come from without internet access: a folder of safetensors files named by
`$VAEGAN_WEIGHTS_DIR`, then torchvision's cache, which downloads only when `$VAEGAN_OFFLINE` allows it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

WEIGHTS_DIR_VARIABLE = "VAEGAN_WEIGHTS_DIR"
# Set (to anything but "" or "0") to forbid downloads: torchvision's weights are then taken from its cache only.
OFFLINE_VARIABLE = "VAEGAN_OFFLINE"


class MissingWeights(RuntimeError):
    """Pretrained weights that are nowhere on disk and may not be downloaded: the message names the file to
    provide and where to put it."""


def weights_dir_file(file_name: str, tried: list[str]) -> Path | None:
    """`$VAEGAN_WEIGHTS_DIR/file_name` when that file exists; otherwise None, with the reason added to `tried`."""
    weights_dir = os.environ.get(WEIGHTS_DIR_VARIABLE)
    if not weights_dir:
        tried.append(f"${WEIGHTS_DIR_VARIABLE} is not set")
        return None
    path = Path(weights_dir) / file_name
    if not path.is_file():
        tried.append(f"{path} does not exist")
        return None
    return path


def torchvision_pretrained(model_name: str, **kwargs) -> nn.Module:
    """torchvision's model with its DEFAULT ImageNet weights: from its cache, else downloaded, unless
    $VAEGAN_OFFLINE forbids downloads (tests and CI set it, so a reachable server cannot make them download)."""
    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if os.environ.get(OFFLINE_VARIABLE, "") not in ("", "0") and not cached.is_file():
        raise FileNotFoundError(f"{cached} is not cached and ${OFFLINE_VARIABLE} forbids downloading it")
    return getattr(torchvision.models, model_name)(weights=weights, **kwargs)
