"""Tiny autoencoders (TAESD and its family): Conv+ReLU networks that speak a big VAE's normalised latent space.

A tiny autoencoder is distilled from a big VAE: its encoder maps images straight to the latents a diffusion model
sees (already normalised: no scaling factor, no posterior), and its decoder maps those latents back to images. It
costs a few percent of the big VAE's multiply-adds, which is why every diffusion front end previews with one.

The published variants, all built from one description (`TinyConfig`):

  classic   f8, 4 (SD, SDXL), 16 (SD3, Flux.1) latent channels; widths 64, blocks (1, 3, 3, 3) / (3, 3, 3, 1)
  FLUX.2    f8, 32 channels; the blocks at the latent resolution add a 1x1 branch through a GroupNorm (whose
            statistics span the whole image), `midblock_pool=True`
  f32       Sana's DC-AE space: two stride-2 stem convs before the encoder's levels, and a decoder that narrows
            256 -> 128 -> 64 over five upsamplings

Parameter names are diffusers' `AutoencoderTiny` ones (`encoder.layers.i`, `decoder.layers.i`), so the classic
variant's diffusers folder is written without renaming; the original `*_encoder.pth`/`*_decoder.pth` files
index the same `nn.Sequential`s (the decoder's shifted by one: its clamp is layer 0 there), see
`vaegan.formats.tiny`. Conventions: images are in [-1, 1] here, as everywhere in vaegan ([0, 1] inside the
network, as TAESD was trained); the decoder first soft-clamps its input, 3 tanh(z / 3).

A FLUX.2 teacher's normalised latents are 2x2 patches (128 channels at 1/16); TAEF2 works on them folded back
(32 channels at 1/8), so `patch_size` records that layout and `Codec` patchifies the encoder's output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

# TAESD soft-clamps latents to about +-3 before decoding: they are normalised, so this only touches outliers.
LATENT_MAGNITUDE = 3.0


@dataclass(frozen=True)
class TinyConfig:
    """The shape of a tiny autoencoder, named like diffusers' `AutoencoderTiny` config where it has the field."""

    latent_channels: int = 4
    # Encoder levels, highest resolution first; every level after the first halves the image with a stride-2
    # conv, then runs its blocks.
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    # Decoder levels, lowest resolution first; between levels a nearest 2x upsampling and a conv to the next width.
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    # Widths of stride-2 convs (each + ReLU) before the encoder's first level: () for f8, (32, 64) for f32.
    encoder_stem_channels: tuple[int, ...] = ()
    # TAEF2's GroupNorm'd 1x1 branch in the blocks at the latent resolution (encoder's last level, decoder's first).
    midblock_pool: bool = False
    # The teacher's latents are 2x2 patches of these (FLUX.2): the codec patchifies; None for every other space.
    patch_size: tuple[int, int] | None = None
    # The teacher this was distilled from (a path or hub name), for model cards; None when unknown.
    teacher: str | None = None

    def __post_init__(self):
        for name in ("encoder_block_out_channels", "num_encoder_blocks", "decoder_block_out_channels",
                     "num_decoder_blocks", "encoder_stem_channels"):
            object.__setattr__(self, name, tuple(int(value) for value in getattr(self, name)))
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", tuple(int(value) for value in self.patch_size))
        if len(self.encoder_block_out_channels) != len(self.num_encoder_blocks):
            raise ValueError(f"encoder_block_out_channels {self.encoder_block_out_channels} and num_encoder_blocks "
                             f"{self.num_encoder_blocks} must have one entry per level")
        if len(self.decoder_block_out_channels) != len(self.num_decoder_blocks):
            raise ValueError(f"decoder_block_out_channels {self.decoder_block_out_channels} and num_decoder_blocks "
                             f"{self.num_decoder_blocks} must have one entry per level")
        if self.encoder_stem_channels and self.encoder_stem_channels[-1] != self.encoder_block_out_channels[0]:
            raise ValueError(f"the encoder stem must end at the first level's width "
                             f"{self.encoder_block_out_channels[0]}, got {self.encoder_stem_channels}")
        if self.downsampling_factor != self.upsampling_factor:
            raise ValueError(f"the encoder downsamples {self.downsampling_factor}x but the decoder upsamples "
                             f"{self.upsampling_factor}x")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.encoder_stem_channels) + len(self.encoder_block_out_channels) - 1)

    @property
    def upsampling_factor(self) -> int:
        return 2 ** (len(self.decoder_block_out_channels) - 1)

    @property
    def diffusers_compatible(self) -> bool:
        """Whether diffusers' `AutoencoderTiny` builds this network: one width throughout, no stem, no pool branch."""
        widths = set(self.encoder_block_out_channels) | set(self.decoder_block_out_channels)
        return len(widths) == 1 and not self.encoder_stem_channels and not self.midblock_pool

    def replace(self, **changes) -> TinyConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON types, marked with diffusers' class name: how a stored config tells a tiny network apart."""
        return {"_class_name": "AutoencoderTiny"} | {
            key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict) -> TinyConfig:
        """From our config dict or diffusers' `AutoencoderTiny` config.json (keys we do not use are ignored)."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


# The published variants; `latent_channels` follows the teacher (4 for SD/SDXL, 16 for SD3/Flux.1).
TINY_PRESETS: dict[str, TinyConfig] = {
    "taesd": TinyConfig(),
    "taef2": TinyConfig(latent_channels=32, midblock_pool=True, patch_size=(2, 2)),
    "taesana": TinyConfig(
        latent_channels=32, encoder_stem_channels=(32, 64),
        decoder_block_out_channels=(256, 128, 64, 64, 64, 64), num_decoder_blocks=(3, 3, 3, 3, 3, 1),
    ),
}


def conv(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class TinyBlock(nn.Module):
    """Three 3x3 convs with ReLUs between, a residual, a ReLU after; optionally TAEF2's pooled 1x1 branch first."""

    def __init__(self, channels: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(channels, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(),
                                  conv(channels, channels))
        self.skip = nn.Identity()  # diffusers' block has a 1x1 skip for unequal widths, which none of these have
        self.fuse = nn.ReLU()
        # 4x wider, normalised over the whole image in 4 groups: a cheap global context for the latent-level blocks.
        self.pool = nn.Sequential(
            nn.Conv2d(channels, 4 * channels, 1, bias=False), nn.GroupNorm(4, 4 * channels), nn.ReLU(),
            nn.Conv2d(4 * channels, channels, 1, bias=False),
        ) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> latents (B, C, H/f, W/f)."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        widths, counts = config.encoder_block_out_channels, config.num_encoder_blocks
        layers: list[nn.Module] = []
        channels = 3
        for width in config.encoder_stem_channels:
            layers += [conv(channels, width, stride=2), nn.ReLU()]
            channels = width
        last = len(widths) - 1
        for level, (width, count) in enumerate(zip(widths, counts, strict=True)):
            if level == 0 and not config.encoder_stem_channels:
                layers.append(conv(channels, width))
            elif level > 0:
                layers.append(conv(channels, width, stride=2, bias=False))
            layers += [TinyBlock(width, pool=config.midblock_pool and level == last) for _ in range(count)]
            channels = width
        layers.append(conv(channels, config.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TinyDecoder(nn.Module):
    """Latents (B, C, h, w) -> images (B, 3, h*f, w*f), nominally in [0, 1]; the input is soft-clamped first."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        widths, counts = config.decoder_block_out_channels, config.num_decoder_blocks
        layers: list[nn.Module] = [conv(config.latent_channels, widths[0]), nn.ReLU()]
        for level, (width, count) in enumerate(zip(widths, counts, strict=True)):
            layers += [TinyBlock(width, pool=config.midblock_pool and level == 0) for _ in range(count)]
            if level + 1 < len(widths):
                layers += [nn.Upsample(scale_factor=2), conv(width, widths[level + 1], bias=False)]
        layers.append(conv(widths[-1], 3))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(z / LATENT_MAGNITUDE) * LATENT_MAGNITUDE)


class MissingPart(RuntimeError):
    """An encoder or decoder that the loaded files did not hold (a previewer ships only a decoder)."""


class TinyAutoencoder(nn.Module):
    """A tiny encoder and decoder in the normalised latent space of a big VAE (see the module doc).

    `encode` and `decode` take and give images in [-1, 1], like `AutoencoderKL`'s. Either part may be None when
    the weights held only the other; calling it raises `MissingPart` naming what to load.
    """

    def __init__(self, config: TinyConfig | None = None, encoder: bool = True, decoder: bool = True,
                 source: str | None = None):
        super().__init__()
        self.config = config or TinyConfig()
        self.encoder = TinyEncoder(self.config) if encoder else None
        self.decoder = TinyDecoder(self.config) if decoder else None
        self.source = source  # where the weights came from, for the message when a part is missing
        self.latent_preview = None  # a tiny decoder is itself the cheap preview: no linear map is fitted for it

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TinyAutoencoder:
        if name not in TINY_PRESETS:
            raise ValueError(f"unknown tiny preset {name!r}; choose one of {', '.join(TINY_PRESETS)}")
        return cls(TINY_PRESETS[name].replace(**overrides))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f) in the teacher's normalised space (folded
        back to the VAE's layout for a FLUX.2 teacher, see the module doc)."""
        return self._part("encoder")(x * 0.5 + 0.5)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, h*f, w*f), nominally in [-1, 1] (not clamped)."""
        return self._part("decoder")(z) * 2.0 - 1.0

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """`encode` as a posterior's (mean, log-variance) with a variance of e^-30: a tiny encoder is deterministic,
        so code written for KL autoencoders' posteriors (dataset encoding) samples its mean."""
        mean = self.encode(x)
        return torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv weight: where the adaptive GAN weight compares gradient norms."""
        return self._part("decoder").layers[-1].weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _part(self, name: str) -> nn.Module:
        part = getattr(self, name)
        if part is None:
            where = f" {self.source}" if self.source else " these weights"
            raise MissingPart(f"{where.strip()} hold no {name}: load the {name} file too (for a TAESD pair, the "
                              f"*_{name}.pth beside the other)")
        return part


def multiply_adds_per_pixel(network: nn.Module, image_side: int = 256, factor: int = 8) -> float:
    """Multiply-adds per output pixel of an encoder or decoder, counted over its convolutions on a square image."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        kernel = module.weight[0].numel()  # in_channels/groups * kh * kw
        total += kernel * output.numel()

    hooks = [module.register_forward_hook(count) for module in network.modules() if isinstance(module, nn.Conv2d)]
    try:
        parameter = next(network.parameters())
        first = next(module for module in network.modules() if isinstance(module, nn.Conv2d))
        side = image_side if first.in_channels == 3 else image_side // factor
        with torch.no_grad():
            network(torch.zeros(1, first.in_channels, side, side, device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return total / image_side**2
