"""Inception-v3 pool3 features (2048-d) for rFID, loadable without internet access.

rFID is the Fréchet distance (`vaegan.metrics.distribution.frechet_distance`) between the Inception features of
the original images and of their reconstructions. The features are the 2048-d average pool after `Mixed_7c`
("pool3"), computed on images resized to 299x299 bilinearly and given to the network in [-1, 1], as pytorch-fid
does.

Which weights, honestly: FID numbers are only comparable with published ones when the network is the one the
papers used, TensorFlow's 2015 Inception graph. pytorch-fid ships a port of it (`pt_inception-2015-12-05`,
1008 classes) whose pooling differs from torchvision's Inception in four block types; `variant="pytorch-fid"`
builds those blocks. torchvision's own ImageNet Inception (1000 classes) gives a similar but *different* number.
The weights are looked up offline first, like the LPIPS backbones:

1. the safetensors file passed as `weights`;
2. `$VAEGAN_WEIGHTS_DIR/inception_v3_features.safetensors`;
3. torchvision's cache or download of its `inception_v3` weights (the torchvision variant), which fails offline.

The file holds a state dict with torchvision's `inception_v3` key names (pytorch-fid's file already has them);
`AuxLogits.*` and `fc.*` tensors are allowed and ignored, except that `fc.weight` tells the variant apart
(1008 rows: pytorch-fid, 1000: torchvision). Converting pytorch-fid's file:
`save_file(torch.load("pt_inception-2015-12-05-6726825d.pth"), "inception_v3_features.safetensors")`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from vaegan.pretrained.weights import WEIGHTS_DIR_VARIABLE, MissingWeights, torchvision_pretrained, weights_dir_file

InceptionVariant = Literal["auto", "pytorch-fid", "torchvision"]
INCEPTION_FILE = "inception_v3_features.safetensors"
FEATURE_DIM = 2048
INPUT_SIZE = 299
# Rows of `fc.weight`, the one tensor that tells the two weight sets apart.
CLASSES = {"pytorch-fid": 1008, "torchvision": 1000}


class MissingInceptionWeights(MissingWeights):
    """No Inception weights anywhere: the message names the file that enables rFID."""


class _FIDInceptionA(InceptionA):
    """TF's Inception pools without counting the zero padding (pytorch-fid's FIDInceptionA)."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # The pooling branch is the last of torchvision's outputs; only its pool differs, so it is recomputed.
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return outputs


class _FIDInceptionC(InceptionC):
    """As `_FIDInceptionA`, for the 17x17 blocks."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return outputs


class _FIDInceptionE(InceptionE):
    """As `_FIDInceptionA` for Mixed_7b; Mixed_7c (`max_pool=True`) max-pools instead, a quirk of TF's graph."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = super()._forward(x)
        if self.max_pool:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        outputs[-1] = self.branch_pool(pooled)
        return outputs


def build_inception(variant: Literal["pytorch-fid", "torchvision"]) -> Inception3:
    """An untrained Inception-v3 without auxiliary head, with pytorch-fid's blocks for that variant."""
    # init_weights=False: the default initialisation draws truncated normals through scipy, seconds of waste
    # for weights that are overwritten next.
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=CLASSES[variant]
    )
    if variant == "pytorch-fid":
        net.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = _FIDInceptionE(1280, max_pool=False)
        net.Mixed_7c = _FIDInceptionE(2048, max_pool=True)
    return net


class InceptionFeatures(nn.Module):
    """Frozen Inception-v3 pool3 features: images (B, 3, H, W) in [-1, 1] -> (B, 2048) float32.

    Args:
        weights: a safetensors file (see the module doc); None looks in `$VAEGAN_WEIGHTS_DIR`, then torchvision.
        variant: "pytorch-fid" (TF-Inception port), "torchvision", or "auto" to tell from `fc.weight`.
    """

    def __init__(self, weights: str | os.PathLike | None = None, variant: InceptionVariant = "auto"):
        super().__init__()
        state, self.source = find_inception_weights(weights)
        self.variant = resolve_variant(variant, state, self.source)
        net = build_inception(self.variant)
        features = {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "fc."))}
        expected = {k for k in net.state_dict() if not k.startswith("fc.")}
        missing, unexpected = sorted(expected - set(features)), sorted(set(features) - expected)
        if missing or unexpected:
            raise RuntimeError(
                f"Inception weights from {self.source} do not match torchvision's inception_v3: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            )
        try:
            net.load_state_dict(features, strict=False)  # fc is not used: only the pool3 features are
        except RuntimeError as error:  # shape mismatches: name the file, not just the tensor
            raise RuntimeError(f"Inception weights from {self.source} do not fit the network: {error}") from error
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2,
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d,
            net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e,
            net.Mixed_7a, net.Mixed_7b, net.Mixed_7c,
            nn.AdaptiveAvgPool2d(1),
        )
        self.requires_grad_(False)
        self.eval()

    @property
    def description(self) -> str:
        """Which network and weights, for reports: numbers are comparable only between equal descriptions."""
        return f"Inception-v3 pool3, {self.variant} weights from {self.source}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = F.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            return self.blocks(x).flatten(1)  # (B, 2048)


def find_inception_weights(weights: str | os.PathLike | None) -> tuple[dict[str, torch.Tensor], str]:
    """The Inception state dict and where it came from; raises `MissingInceptionWeights` naming the file."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found; {missing_inception_hint()}")
        return load_file(path), str(path)
    tried: list[str] = []
    if (path := weights_dir_file(INCEPTION_FILE, tried)) is not None:
        return load_file(path), str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = torchvision_pretrained("inception_v3")
    except Exception as error:  # offline: URLError, OSError, ... depending on where it fails
        tried.append(f"torchvision could not load its inception_v3 weights ({type(error).__name__})")
        raise MissingInceptionWeights(f"{missing_inception_hint()}; tried: {'; '.join(tried)}") from None
    return model.state_dict(), "torchvision inception_v3 weights (DEFAULT)"


def missing_inception_hint() -> str:
    return (
        f"rFID needs {INCEPTION_FILE} (an inception_v3 state dict, see vaegan/pretrained/inception.py) in "
        f"${WEIGHTS_DIR_VARIABLE}, or a file given as --inception_weights"
    )


def resolve_variant(
    variant: InceptionVariant, state: dict[str, torch.Tensor], source: str
) -> Literal["pytorch-fid", "torchvision"]:
    """The variant asked for, or the one `fc.weight` reveals (1008 classes: pytorch-fid; 1000: torchvision)."""
    if variant not in ("auto", *CLASSES):
        raise ValueError(f"unknown Inception variant {variant!r}; choose auto, pytorch-fid or torchvision")
    if variant != "auto":
        return variant
    rows = state["fc.weight"].shape[0] if "fc.weight" in state else None
    for name, classes in CLASSES.items():
        if rows == classes:
            return name
    raise ValueError(
        f"cannot tell which Inception {source} holds (fc.weight has {rows} rows, expected 1008 for pytorch-fid "
        "or 1000 for torchvision): name it with variant= / --inception-variant"
    )
