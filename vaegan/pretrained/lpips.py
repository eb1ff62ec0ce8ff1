"""LPIPS (Zhang et al. 2018) as a frozen training loss, loadable without internet access.

The `lpips` package builds the network and ships the small linear heads (`weights/v0.1/<net>.pth`); the
ImageNet backbone is ours to find, offline first:

1. the safetensors file passed as `weights`;
2. `$VAEGAN_WEIGHTS_DIR/<torchvision model>_features.safetensors` (`vgg16_features`, `alexnet_features`,
   `squeezenet1_1_features`): the `state_dict()` of `torchvision.models.<model>().features`;
3. torchvision's own cache or download (`$TORCH_HOME/hub/checkpoints`), which fails offline.

When none works the constructor raises and names the file to provide. A random backbone (only for smoke
tests: it measures nothing perceptual) must be asked for with `allow_random_backbone=True`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import lpips
import torch
from safetensors.torch import load_file
from torch import nn

from vaegan.pretrained.weights import WEIGHTS_DIR_VARIABLE, MissingWeights, torchvision_pretrained, weights_dir_file

PerceptualNet = Literal["vgg", "alex", "squeeze"]

# The torchvision model whose `features` each LPIPS variant uses.
TORCHVISION_MODELS: dict[str, str] = {"vgg": "vgg16", "alex": "alexnet", "squeeze": "squeezenet1_1"}


def backbone_file_name(net: PerceptualNet) -> str:
    """The file name under which the backbone's features are looked up in `$VAEGAN_WEIGHTS_DIR`."""
    return f"{TORCHVISION_MODELS[net]}_features.safetensors"


class PerceptualLoss(nn.Module):
    """Frozen LPIPS distance between images in [-1, 1]: (B, 3, H, W) x 2 -> (B,).

    Frozen means: every parameter has `requires_grad=False` and the network stays in eval mode even when a
    parent calls `.train()` (LPIPS has Dropout before its heads, which the public trainers switched back on with
    every `.train()` of the parent on Lightning < 2.2). Gradients still flow to the *input images*: this is what
    trains the decoder.

    It is a submodule of the training module so that `.to(device)` moves it, but it must be in no optimizer:
    build the optimizers from the autoencoder's parameters (and the log-variance), never from
    `module.parameters()`. The training module leaves its weights out of checkpoints: they are rebuilt from the
    same weights file.

    Args:
        net: the backbone; `vgg` trains the latent-diffusion VAEs, `alex` is the usual evaluation metric.
        weights: a safetensors file with the state dict of `torchvision.models.<model>().features`.
        allow_random_backbone: use a randomly initialised backbone when no weights can be found (warns).
    """

    def __init__(
        self,
        net: PerceptualNet = "vgg",
        weights: str | os.PathLike | None = None,
        allow_random_backbone: bool = False,
    ):
        super().__init__()
        if net not in TORCHVISION_MODELS:
            raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {', '.join(TORCHVISION_MODELS)}")
        self.net_name = net
        # pnet_rand=True builds the backbone without downloading; pretrained=False skips lpips' own head
        # loading (a torch.load that relies on the default of weights_only, and a non-strict load that would
        # miss a wrong file silently). We load both parts ourselves below, strictly.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation of `pretrained=`
            self.model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
        self._load_heads()
        features, self.backbone_source = find_backbone(net, weights)
        if features is None:
            if not allow_random_backbone:
                raise MissingWeights(missing_weights_message(net, self.backbone_source))
            warnings.warn(
                f"LPIPS-{net} runs on a RANDOM backbone: the perceptual loss measures nothing perceptual. "
                f"{missing_weights_message(net, self.backbone_source)}",
                stacklevel=2,
            )
            self.backbone_source = "random"
        else:
            load_backbone(self.model.net, features, source=self.backbone_source)
        self.requires_grad_(False)
        super().train(False)

    def _load_heads(self) -> None:
        """Load the package's linear heads (v0.1) strictly, with `weights_only=True`."""
        path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{self.net_name}.pth"
        heads = torch.load(path, map_location="cpu", weights_only=True)
        # lpips registers each head twice (lin0 and lins.0); the file names the lin<k> copies.
        expected = {f"lin{k}.model.1.weight" for k in range(len(self.model.lins))}
        if set(heads) != expected:
            raise RuntimeError(f"unexpected LPIPS head keys in {path}: {sorted(heads)}")
        for key, value in heads.items():
            self.model.get_parameter(key).data.copy_(value)

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Ignore `mode`: the network stays in eval mode (no Dropout) for good."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image, (B,), of images in [-1, 1].

        The network runs in fp32 with autocast off: the unit-normalisation of deep features sums hundreds of
        squared activations, which overflows in fp16.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, y = x.float(), y.float()
            features_x = self.model.net(self.model.scaling_layer(x))
            features_y = self.model.net(self.model.scaling_layer(y))
            distance = 0
            for head, fx, fy in zip(self.model.lins, features_x, features_y, strict=True):
                difference = (lpips.normalize_tensor(fx) - lpips.normalize_tensor(fy)).pow(2)
                distance = distance + head(difference).mean(dim=(2, 3))  # (B, 1)
            return distance.squeeze(1)


def find_backbone(
    net: PerceptualNet, weights: str | os.PathLike | None
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The backbone's features state dict and where it came from, or (None, what was tried)."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS backbone weights {path} not found; it should hold the state dict of "
                f"torchvision.models.{TORCHVISION_MODELS[net]}().features as safetensors"
            )
        return load_file(path), str(path)

    tried: list[str] = []
    if (path := weights_dir_file(backbone_file_name(net), tried)) is not None:
        return load_file(path), str(path)

    model_name = TORCHVISION_MODELS[net]
    try:
        model = torchvision_pretrained(model_name)
    except Exception as error:  # offline: URLError, OSError, RuntimeError, ... depending on where it fails
        tried.append(f"torchvision could not load its {model_name} weights ({type(error).__name__}: {error})")
        return None, "; ".join(tried)
    return model.features.state_dict(), f"torchvision {model_name} weights (DEFAULT)"


def missing_weights_message(net: PerceptualNet, tried: str) -> str:
    model_name = TORCHVISION_MODELS[net]
    return (
        f"No ImageNet weights for the LPIPS-{net} backbone: {tried}. Put {backbone_file_name(net)} (the "
        f"state dict of torchvision.models.{model_name}().features, saved with safetensors) into the folder "
        f"named by ${WEIGHTS_DIR_VARIABLE} (scripts/demo.sh uses ../shared/assets/lpips when it exists), or give "
        f"its path (vaegan fit: --model.perceptual_weights_file; Python: `weights=`), or run once with internet access "
        f"so torchvision caches {model_name} under $TORCH_HOME/hub/checkpoints (docs/guides/offline-weights.md)."
    )


def load_backbone(backbone: nn.Module, features: dict[str, torch.Tensor], source: str) -> None:
    """Copy torchvision `features` weights into lpips' backbone, strictly.

    lpips splits `features` into `slice1`...`sliceN` but keeps torchvision's layer indices as module names, so
    `slice2.3.weight` is `features[3].weight`, stored as `3.weight`. Every backbone parameter must be in
    `features` and every tensor of `features` must be used, with matching shapes.
    """
    # "3.weight" -> "slice2.3.weight"
    targets = {name.split(".", 1)[1]: name for name in backbone.state_dict()}
    missing = sorted(set(targets) - set(features))
    unexpected = sorted(set(features) - set(targets))
    if missing or unexpected:
        raise RuntimeError(
            f"LPIPS backbone weights from {source} do not match the network: missing {missing}, "
            f"unexpected {unexpected}"
        )
    state = {targets[key]: value for key, value in features.items()}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:  # shape mismatches: name the file, not just the tensor
        raise RuntimeError(f"LPIPS backbone weights from {source} do not fit the network: {error}") from error
