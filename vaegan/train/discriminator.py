"""The PatchGAN discriminator of pix2pix (Isola et al. 2017), as used by every latent-diffusion VAE recipe.

It classifies overlapping patches rather than whole images: each output logit sees a 70x70 receptive field
(with the default three strided layers), so it judges local texture, which is exactly what L1 + LPIPS leave
blurry. The network knows nothing of losses or optimizers; `vaegan.train.losses` turns its logits into losses and the
training module owns it and its optimizer.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as apply_spectral_norm

NormKind = Literal["batch", "group", "none"]


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    """The normalisation after each inner conv.

    GroupNorm uses up to 32 groups (fewer when `channels` is not a multiple of 32), as in the autoencoder.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose 'batch', 'group' or 'none'")


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: images (B, C, H, W) -> real/fake logits per patch (B, 1, h, w).

    Layout (4x4 convs, padding 1, LeakyReLU 0.2): one stride-2 conv without norm, `num_layers - 1` stride-2
    conv-norm layers, one stride-1 conv-norm layer, and a stride-1 conv to a single channel. Widths are
    `base_channels` times 1, 2, 4, 8, 8, ... (the multiplier is capped at 8). With the defaults a 256x256
    image gives 30x30 logits and a 64x64 image 6x6; each logit sees a 70x70 patch.

    Args:
        in_channels: image channels.
        base_channels: width of the first layer (64 in pix2pix and latent diffusion).
        num_layers: number of stride-2 convs; each one doubles the receptive field (3 gives 70x70).
        norm: `"group"` by default. The released recipe uses BatchNorm, which fails at
            batch size 1 in training mode, normalises real and fake batches with different statistics
            because they go through the network in separate calls, and under DDP needs SyncBatchNorm (the
            training module converts it on CUDA; otherwise each rank normalises with its own statistics).
            GroupNorm has none of these problems: it normalises each image on its own and behaves the same in
            training and evaluation. `"none"` gives the plain conv net (with biases), a good partner for
            spectral norm.
        spectral_norm: wrap every conv in spectral normalisation (Miyato et al. 2018), which bounds the
            discriminator's Lipschitz constant; helps on small data sets.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: NormKind = "group",
        spectral_norm: bool = False,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        make_norm(norm, base_channels)  # validate `norm` before building anything
        # A conv followed by a norm needs no bias: the norm's shift (or mean removal) makes it redundant.
        bias = norm == "none"

        def conv(c_in: int, c_out: int, stride: int, with_bias: bool) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=with_bias)

        # The first layer has no norm (pix2pix): normalising raw pixels would throw away their statistics.
        layers: list[nn.Module] = [conv(in_channels, base_channels, 2, True), nn.LeakyReLU(0.2)]
        width = base_channels
        for index in range(1, num_layers + 1):
            next_width = base_channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1  # the last inner layer keeps the resolution
            layers += [conv(width, next_width, stride, bias), make_norm(norm, next_width), nn.LeakyReLU(0.2)]
            width = next_width
        layers.append(conv(width, 1, 1, True))  # one logit per patch
        self.layers = nn.Sequential(*layers)

        self.apply(init_weights)
        if spectral_norm:
            for module in self.layers:
                if isinstance(module, nn.Conv2d):
                    apply_spectral_norm(module)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Default 256x256 input: (B, 64, 128, 128) -> (B, 128, 64, 64) -> (B, 256, 32, 32)
        # -> (B, 512, 31, 31) -> logits (B, 1, 30, 30).
        return self.layers(images)


def init_weights(module: nn.Module) -> None:
    """DCGAN/pix2pix init: conv weights N(0, 0.02), norm scales N(1, 0.02), all biases zero."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
