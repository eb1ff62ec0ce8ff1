"""Image features for a distance between two sets of images (generated vs real): Inception-v3 when its weights
are found, so the distance is FID, and otherwise an ImageNet backbone that is at hand, whose Fréchet distance is
named after it and never called FID.

    features = DistributionFeatures.find("auto")        # Inception if found, else AlexNet
    features.name                                       # "FID" or "FD-AlexNet": the column title
    features.description                                # which network, layer and weights, for the report

FID's numbers only mean something next to other numbers from the same network, weights, image size and number
of images; a Fréchet distance on AlexNet features is a different scale altogether. Both compare sets measured
the same way, which is what the diffusion probe needs: VAEs side by side.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vaegan.pretrained.inception import InceptionFeatures, MissingInceptionWeights
from vaegan.pretrained.lpips import TORCHVISION_MODELS, find_backbone, missing_weights_message

FeatureNetwork = Literal["auto", "inception", "alex", "squeeze"]
# Torchvision's ImageNet input normalisation, which both backbones were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_INPUT_SIZE = 224
BACKBONE_TITLES = {"alex": "AlexNet", "squeeze": "SqueezeNet1.1"}


class BackboneFeatures(nn.Module):
    """Frozen ImageNet features of torchvision's AlexNet or SqueezeNet 1.1: images (B, 3, H, W) in [-1, 1] ->
    (B, D) float32, the last convolutional block's activations averaged over space (AlexNet: conv5 after ReLU,
    256-d; SqueezeNet: the last Fire module, 512-d), on images resized to 224x224 (bilinear) as ImageNet
    trained them. The weights are the LPIPS backbones' (`vaegan.pretrained.lpips.find_backbone`).
    """

    def __init__(self, net: Literal["alex", "squeeze"]):
        super().__init__()
        state, self.source = find_backbone(net, None)
        if state is None:
            raise FileNotFoundError(missing_weights_message(net, self.source))
        model_name = TORCHVISION_MODELS[net]
        features = getattr(torchvision.models, model_name)(weights=None).features
        features.load_state_dict(state, strict=True)
        # The final max-pool of AlexNet's features would leave a 6x6 map of maxima; its last ReLU is the layer.
        self.blocks = features[:-1] if net == "alex" else features
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def description(self) -> str:
        return (f"Fréchet distance of {BACKBONE_TITLES[self.net]} features (last convolutional block, spatial mean, "
                f"images resized to {BACKBONE_INPUT_SIZE}x{BACKBONE_INPUT_SIZE}), ImageNet weights from "
                f"{self.source}; not FID, and on a scale of its own")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = F.interpolate(images.float(), size=(BACKBONE_INPUT_SIZE,) * 2, mode="bilinear", align_corners=False)
            x = ((x + 1) / 2 - self.mean) / self.std
            return self.blocks(x).mean(dim=(2, 3))  # (B, D)


class DistributionFeatures(nn.Module):
    """The feature network of a distribution distance, with the distance's name: "FID" for Inception-v3 pool3,
    "FD-AlexNet" / "FD-SqueezeNet1.1" for the backbones."""

    def __init__(self, network: nn.Module, name: str, description: str):
        super().__init__()
        self.network, self.name, self.description = network, name, description

    @classmethod
    def find(cls, network: FeatureNetwork = "auto", inception_weights: str | None = None) -> DistributionFeatures:
        """`auto`: Inception (FID) when weights are found (the lookup of `vaegan eval`'s rFID), else AlexNet.
        `inception` insists on Inception; `alex` / `squeeze` use that backbone even when Inception is there."""
        if network in ("auto", "inception"):
            try:
                inception = InceptionFeatures(inception_weights)
                return cls(inception, "FID", f"FID: {inception.description}")
            except MissingInceptionWeights:
                if network == "inception" or inception_weights is not None:
                    raise
            network = "alex"
        if network not in BACKBONE_TITLES:
            raise ValueError(f"unknown feature network {network!r}; choose auto, inception, alex or squeeze")
        backbone = BackboneFeatures(network)
        return cls(backbone, f"FD-{BACKBONE_TITLES[network]}", backbone.description)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> features (B, D) float32."""
        return self.network(images)
