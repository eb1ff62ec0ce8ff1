"""A frozen vision model whose features the latents are aligned to (VA-VAE's VF loss), loadable offline.

Two families:

- DINOv2 (what VA-VAE aligns to), built with `timm` (an optional dependency: `pip install timm`). Weights come
  from the file passed as `weights`, else `$VAEGAN_WEIGHTS_DIR/<name>.safetensors` (the `state_dict()` of timm's
  model, see `DINOV2_MODELS`), else the Hugging Face hub when the machine is online and `$VAEGAN_OFFLINE` allows.
- torchvision's AlexNet, SqueezeNet 1.1 and VGG16 `features`, from the same files LPIPS reads
  (`$VAEGAN_WEIGHTS_DIR/<model>_features.safetensors`), else torchvision's cache.

A missing backbone stops the run at construction with a message naming the file; a random backbone (it aligns to
nothing meaningful) must be asked for with `allow_random=True`, for smoke tests only.

Like LPIPS, the network is frozen, stays in eval mode, and keeps its weights out of the state dict of whatever
module holds it: they are rebuilt from the weights file, so checkpoints do not carry a second copy of DINOv2.
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

from vaegan.pretrained.weights import OFFLINE_VARIABLE, WEIGHTS_DIR_VARIABLE, torchvision_pretrained, weights_dir_file

VisionBackbone = Literal[
    "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "alexnet", "squeezenet1_1", "vgg16"
]

# timm's names of the DINOv2 models (Oquab et al. 2023; LVD-142M weights, patch 14).
DINOV2_MODELS: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
}
# torchvision `features` up to the last convolution block, before the final max-pool: the finest grid with the
# deepest features (13×13 for AlexNet and SqueezeNet, 14×14 for VGG16 at 224²).
TORCHVISION_LAYERS: dict[str, int] = {"alexnet": 12, "squeezenet1_1": 13, "vgg16": 30}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weights_file_name(name: VisionBackbone) -> str:
    """The file the backbone's weights are looked up under in `$VAEGAN_WEIGHTS_DIR`."""
    return f"{name}.safetensors" if name in DINOV2_MODELS else f"{name}_features.safetensors"


class VisionFeatures(nn.Module):
    """Frozen features of images in [-1, 1]: (B, 3, H, W) -> (B, D, g, g'), on a grid of `image_size` / stride.

    Images are resized (bilinear, antialiased) to `image_size` squared and normalised with ImageNet's mean and
    std, as the backbones were trained; `dim` is D.

    Args:
        name: the backbone (see `VisionBackbone`).
        weights: a safetensors file with its weights (timm's state dict for DINOv2, torchvision's `features` for
            the others); default: looked up as the module doc says.
        image_size: the side the images are resized to; 224 gives DINOv2 a 16×16 grid of patch tokens.
        allow_random: build a random backbone when no weights are found (warns; smoke tests only).
    """

    def __init__(self, name: VisionBackbone, weights: str | os.PathLike | None = None, image_size: int = 224,
                 allow_random: bool = False):
        super().__init__()
        if name not in DINOV2_MODELS and name not in TORCHVISION_LAYERS:
            raise ValueError(f"unknown vision backbone {name!r}; choose one of {', '.join(VisionBackbone.__args__)}")
        self.name, self.image_size = name, image_size
        if name in DINOV2_MODELS:
            self.network, self.source = _dinov2(name, weights, allow_random)
        else:
            self.network, self.source = _torchvision_features(name, weights, allow_random)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            self.dim = self(torch.zeros(1, 3, image_size, image_size)).shape[1]
        self.requires_grad_(False)
        super().train(False)
        # Out of every state dict that holds this module (rebuilt from the file), and put back before a strict
        # load, as the training module does for LPIPS.
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_restore_own_keys)

    def train(self, mode: bool = True) -> VisionFeatures:
        """Ignore `mode`: the network stays in eval mode for good."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        if self.name not in DINOV2_MODELS:
            return self.network(x)  # (B, D, g, g)
        tokens = self.network.forward_features(x)  # (B, prefix + g*g', D)
        patches = tokens[:, self.network.num_prefix_tokens:]
        grid = self.image_size // self.network.patch_embed.patch_size[0]
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, grid, grid)  # (B, D, g, g)


def _drop_own_keys(module: VisionFeatures, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [key for key in state_dict if key.startswith(prefix)]:
        del state_dict[key]


def _restore_own_keys(module: VisionFeatures, state_dict: dict, prefix: str, *args) -> None:
    for key, value in module.network.state_dict(keep_vars=True).items():
        state_dict.setdefault(f"{prefix}network.{key}", value.detach())


def _torchvision_features(name: str, weights, allow_random: bool) -> tuple[nn.Module, str]:
    network = getattr(torchvision.models, name)().features[: TORCHVISION_LAYERS[name]]
    state, source = None, ""
    if weights is not None:
        state, source = load_file(_existing(weights, name)), str(weights)
    else:
        tried: list[str] = []
        if (path := weights_dir_file(weights_file_name(name), tried)) is not None:
            state, source = load_file(path), str(path)
        else:
            try:
                state, source = torchvision_pretrained(name).features.state_dict(), f"torchvision {name} (DEFAULT)"
            except Exception as error:  # offline: URLError, OSError, RuntimeError ... depending on where it fails
                tried.append(f"torchvision could not load its {name} weights ({type(error).__name__}: {error})")
                source = "; ".join(tried)
    if state is None:
        return _random_or_raise(network, name, source, allow_random)
    # The truncated `features` keep torchvision's layer indices and every convolution, so the file fits strictly.
    network.load_state_dict(state, strict=True)
    return network, source


def _dinov2(name: str, weights, allow_random: bool) -> tuple[nn.Module, str]:
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"the {name} backbone is built with timm: pip install timm (or vaegan[align])") from error
    # dynamic_img_size: the position embeddings (stored for 518² inputs) are interpolated to the input's grid.
    network = timm.create_model(DINOV2_MODELS[name], pretrained=False, num_classes=0, dynamic_img_size=True)
    tried: list[str] = []
    path = Path(_existing(weights, name)) if weights is not None else weights_dir_file(weights_file_name(name), tried)
    if path is not None:
        network.load_state_dict(load_file(path), strict=True)
        return network, str(path)
    if os.environ.get(OFFLINE_VARIABLE, "") in ("", "0"):
        try:
            network = timm.create_model(DINOV2_MODELS[name], pretrained=True, num_classes=0, dynamic_img_size=True)
            return network, f"timm {DINOV2_MODELS[name]} (hub)"
        except Exception as error:  # offline or the hub unreachable
            tried.append(f"the hub download of {DINOV2_MODELS[name]} failed ({type(error).__name__}: {error})")
    else:
        tried.append(f"${OFFLINE_VARIABLE} forbids downloading {DINOV2_MODELS[name]}")
    return _random_or_raise(network, name, "; ".join(tried), allow_random)


def _existing(weights: str | os.PathLike, name: str) -> str:
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{name} weights {weights} not found; {_what_the_file_holds(name)}")
    return str(weights)


def _what_the_file_holds(name: str) -> str:
    if name in DINOV2_MODELS:
        return (f"it should hold the state dict of timm.create_model({DINOV2_MODELS[name]!r}, pretrained=True, "
                "num_classes=0) as safetensors")
    return f"it should hold the state dict of torchvision.models.{name}().features as safetensors"


def _random_or_raise(network: nn.Module, name: str, tried: str, allow_random: bool) -> tuple[nn.Module, str]:
    message = (
        f"No weights for the {name} vision backbone: {tried}. Put {weights_file_name(name)} into the folder "
        f"named by ${WEIGHTS_DIR_VARIABLE} ({_what_the_file_holds(name)}), or pass its path."
    )
    if not allow_random:
        raise RuntimeError(message)
    warnings.warn(f"{name} runs with RANDOM weights: alignment to it means nothing. {message}", stacklevel=3)
    return network, "random"
