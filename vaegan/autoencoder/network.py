"""The KL autoencoder of latent diffusion (Rombach et al. 2022), in diffusers' parameter names.

An encoder maps an image to a diagonal Gaussian over latents, a decoder maps latents back to the image.
Every parameter name and config key matches `diffusers.AutoencoderKL` (FLUX.2's: `AutoencoderKLFlux2`), so a
diffusers state dict loads without renaming and a save is a plain file write. The network knows nothing of
files: `vaegan.formats.load` reads and writes it (in diffusers', CompVis' and Black Forest Labs' naming).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vaegan.autoencoder.preview import LatentPreview
from vaegan.kernels.group_norm import group_norm_silu, kernels_apply


@dataclass(frozen=True)
class AutoencoderConfig:
    """Shape-defining settings and latent statistics, named exactly as the keys of diffusers' config.json
    (`AutoencoderKL`'s, and `AutoencoderKLFlux2`'s for the FLUX.2 fields)."""

    in_channels: int = 3
    out_channels: int = 3
    # Widths of the resolution levels; len - 1 of them halve the image, so (128, 256, 512, 512) is f8.
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    # The decoder's widths, listed like the encoder's (highest resolution first), for a decoder wider or
    # narrower than the encoder; None: the encoder's widths, as in every released model (an equal tuple is
    # stored as None, so that a preset with other `block_out_channels` keeps a matching decoder).
    decoder_block_out_channels: tuple[int, ...] | None = None
    # Resnet blocks per encoder level; the decoder has one more per level (as in the released models).
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    # One single-head self-attention block in the middle of encoder and decoder.
    mid_block_add_attention: bool = True
    # 1x1 convs around the latent: present in SD 1.x/2.x/SDXL, dropped by SD3 and Flux.
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # Latent normalisation for diffusion: z_model = (z - shift_factor) * scaling_factor.
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    # Tells diffusers pipelines to run this VAE in fp32 even when the pipeline runs in fp16.
    force_upcast: bool = True
    # The image size the model was trained at; diffusers' tiling only starts above it.
    sample_size: int = 256
    act_fn: str = "silu"
    # Per-channel latent statistics (Playground v2.5's SDXL VAE), which replace shift_factor in diffusers'
    # pipelines: z_model = (z - latents_mean) * scaling_factor / latents_std. None: the scalar factors only.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # FLUX.2: its pipelines patchify the posterior mean patch_size (2x2: 4 * latent_channels channels) and
    # normalise it with the running statistics of a BatchNorm2d(affine=False), which the network carries as
    # `bn.*` buffers and never applies itself: z_model = (patches - running_mean) / sqrt(running_var + eps).
    # None: no such statistics (every other model). They are measured on data, and training leaves them as is.
    patch_size: tuple[int, int] | None = None
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1  # what the statistics were averaged with; kept so that configs round-trip

    def __post_init__(self):
        def tuple_or_none(values, kind=int):
            return None if values is None else tuple(kind(value) for value in values)

        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        decoder_widths = tuple_or_none(self.decoder_block_out_channels)
        if decoder_widths == self.block_out_channels:
            decoder_widths = None
        object.__setattr__(self, "decoder_block_out_channels", decoder_widths)
        object.__setattr__(self, "patch_size", tuple_or_none(self.patch_size))
        object.__setattr__(self, "latents_mean", tuple_or_none(self.latents_mean, float))
        object.__setattr__(self, "latents_std", tuple_or_none(self.latents_std, float))
        if self.act_fn != "silu":
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; every public VAE uses 'silu'")
        for name in ("block_out_channels", "decoder_block_out_channels"):
            widths = getattr(self, name) or ()
            if any(width % self.norm_num_groups for width in widths):
                raise ValueError(f"{name} {widths} must be multiples of norm_num_groups={self.norm_num_groups}")
        if len(self.decoder_widths) != len(self.block_out_channels):
            raise ValueError(
                f"decoder_block_out_channels {self.decoder_block_out_channels} must have one width per level of "
                f"block_out_channels {self.block_out_channels}"
            )
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std go together: diffusers' pipelines use neither alone")
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.latent_channels:
                raise ValueError(f"{name} has {len(values)} values for latent_channels={self.latent_channels}")
        if self.latents_std is not None and min(self.latents_std) <= 0:
            raise ValueError(f"latents_std must be positive, got {self.latents_std}")
        if self.patch_size is not None and (len(self.patch_size) != 2 or min(self.patch_size) < 1):
            raise ValueError(f"patch_size must be two positive sizes (FLUX.2: [2, 2]), got {self.patch_size}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """The decoder's widths, highest resolution first (its last level runs first)."""
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def batch_norm_channels(self) -> int:
        """Channels of the patchified latent that the `bn` statistics describe (FLUX.2: 32 * 2 * 2 = 128)."""
        if self.patch_size is None:
            raise ValueError("this config has no patch_size, so the network carries no latent statistics")
        return self.latent_channels * self.patch_size[0] * self.patch_size[1]

    def replace(self, **changes) -> AutoencoderConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The config as plain JSON types (lists, not tuples)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict, defaults: AutoencoderConfig | None = None) -> AutoencoderConfig:
        """Build from a config dict (ours or diffusers'), ignoring keys that do not define the network; keys
        that `data` lacks take their values from `defaults` (else from this dataclass)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if values.get("shift_factor") is None:
            values.pop("shift_factor", None)  # diffusers writes null when unused
        return (defaults or cls()).replace(**values)


# The released architectures, with the factors their diffusers configs declare (SD 1.x/2.x, SDXL, SD3, Flux.1:
# widths 128-256-512-512, 2 resnets per level, GroupNorm(32); SD3 and Flux drop the quant convs and use 16
# channels), and a mini one that trains on a CPU in minutes.
PRESETS: dict[str, AutoencoderConfig] = {
    "sd": AutoencoderConfig(scaling_factor=0.18215, sample_size=512),
    "sdxl": AutoencoderConfig(scaling_factor=0.13025, sample_size=1024),
    "sd3": AutoencoderConfig(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024,
    ),
    "flux": AutoencoderConfig(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024,
    ),
    # FLUX.2 (Black Forest Labs 2025): SD's network with 32 latent channels and its latent statistics as `bn`
    # buffers; no scalar factors, as its pipelines normalise with those statistics alone.
    "flux2": AutoencoderConfig(
        latent_channels=32, patch_size=(2, 2), batch_norm_eps=1e-4, batch_norm_momentum=0.1,
        scaling_factor=1.0, shift_factor=0.0, sample_size=1024,
    ),
    "mini": AutoencoderConfig(
        block_out_channels=(32, 64, 128), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        scaling_factor=1.0, force_upcast=False, sample_size=128,
    ),
}


# Presets renamed since: the old name still works in configs and training checkpoints, with a warning.
# (`tiny` became `mini`: "tiny autoencoder" means TAESD-style networks in the diffusion world.)
RENAMED_PRESETS = {"tiny": "mini"}


def preset(name: str, **overrides) -> AutoencoderConfig:
    """The config of a named architecture, with optional field overrides."""
    if name in RENAMED_PRESETS:
        warnings.warn(f"the preset {name!r} is now called {RENAMED_PRESETS[name]!r}; {name!r} will stop working in "
                      "a later release", FutureWarning, stacklevel=2)
        name = RENAMED_PRESETS[name]
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


# GroupNorm + SiLU through Triton's kernels (`vaegan.kernels`) where they run (CUDA), with VAEGAN_KERNELS=triton;
# PyTorch's ops otherwise. Opt-in until a GPU has measured the kernels against the ops (docs/guides/gpu.md).
KERNELS = os.environ.get("VAEGAN_KERNELS", "torch")
if KERNELS not in ("torch", "triton"):
    warnings.warn(f"VAEGAN_KERNELS={KERNELS} is neither triton nor torch: PyTorch's ops run", stacklevel=1)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm, then SiLU; in place on the norm's fresh output when no gradient is being recorded, which
    spares a large allocation per layer (the CPU benchmark page measures what it buys). Under `torch.compile`
    always PyTorch's ops: inductor fuses them itself."""
    if KERNELS == "triton" and kernels_apply(x) and not torch.compiler.is_compiling():
        return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


class ResnetBlock2D(nn.Module):
    """Two GroupNorm-SiLU-conv layers with a residual connection (1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(norm_silu(self.norm2, h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' key: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        h = rearrange(self.group_norm(x), "b c h w -> b 1 (h w) c")  # one head
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        h = rearrange(self.to_out[0](h), "b 1 (h w) c -> b c h w", h=height)
        return x + h


class MidBlock2D(nn.Module):
    """Resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    """Halve the resolution: pad right and bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then a 3x3 conv.

    Computed without building the interpolated image, as one stride-2 transposed conv with a 4x4 kernel. After
    nearest-neighbour doubling, output row 2i reads input rows (i-1, i, i) through kernel rows (0, 1, 2), and
    row 2i+1 reads (i, i, i+1). A transposed conv with stride 2 and padding 1 reaches output row 2i from input
    rows i-1 and i through its taps 3 and 1, and row 2i+1 from rows i and i+1 through taps 2 and 0; so each tap
    is a sum of the 3x3 kernel's rows (`UPSAMPLE_FOLD`), and likewise for columns. That is 4 multiply-adds per
    output pixel and tap instead of 9, the same result up to rounding, in one call, and the stored weight stays
    the 3x3 kernel that diffusers and the original checkpoints hold.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, kernel: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, h, w) -> (B, C, 2h, 2w). `kernel`: `self.transposed_kernel()`, from callers that upsample
        many tiles with unchanging weights (folding it once per pass, not once per tile)."""
        kernel = self.transposed_kernel() if kernel is None else kernel
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)

    def transposed_kernel(self) -> torch.Tensor:
        """The 3x3 conv folded into the 4x4 kernel of a stride-2 transposed conv: (C_in, C_out, 4, 4), in the
        weight's memory format (oneDNN reorders a kernel whose format differs from the input's on every call)."""
        weight = self.conv.weight
        fold = weight.new_tensor(UPSAMPLE_FOLD)
        kernel = torch.einsum("ky,oiyx,lx->iokl", fold, weight, fold)
        return kernel.contiguous(memory_format=torch.channels_last) if is_channels_last(weight) else kernel


# Which of the 3x3 kernel's rows (columns) sum into each of the transposed conv's 4 taps: tap k of a stride-2,
# padding-1 transposed conv reaches output row 2i - 1 + k from input row i.
UPSAMPLE_FOLD = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class EncoderBlock(nn.Module):
    """One encoder level: resnet blocks, then an optional downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock2D(a, b, groups) for a, b in pairwise(widths))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    """One decoder level: resnet blocks, then an optional upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock2D(a, b, groups) for a, b in pairwise(widths))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image (B, in, H, W) -> Gaussian parameters (B, 2 * latent, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(
                widths[max(i - 1, 0)], width, config.layers_per_block, groups,
                downsample=i < len(widths) - 1,
            )
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock2D(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)                        # (B, w0, H, W)
        for block in self.down_blocks:
            x = block(x)                           # (B, w[-1], H/f, W/f) after the last level
        x = self.mid_block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))  # (B, 2C, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, out, h*f, w*f); mirrors the encoder, widest level first."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, groups = config.decoder_widths[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock2D(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(
                widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups,
                upsample=i < len(widths) - 1,
            )
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))         # (B, w[-1], h, w)
        for block in self.up_blocks:
            x = block(x)                            # (B, w0, h*f, w*f) after the last level
        return self.conv_out(norm_silu(self.conv_norm_out, x))


@dataclass
class DiagonalGaussian:
    """The posterior q(z|x): a Gaussian with diagonal covariance, parameterised by mean and log-variance."""

    mean: torch.Tensor    # (B, C, h, w)
    logvar: torch.Tensor  # (B, C, h, w), clamped to [-30, 20] as in every released model
    std: torch.Tensor = field(init=False)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    def __post_init__(self):
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements: one value per image, shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder, Gaussian posterior and decoder; `encode` and `decode` work on raw (unscaled) latents."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = config or AutoencoderConfig()
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if self.config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if self.config.use_post_quant_conv else None
        # FLUX.2's latent statistics, as diffusers names them (bn.running_mean, bn.running_var,
        # bn.num_batches_tracked); never called here: encode and decode work on raw latents, like diffusers'.
        self.bn = (
            nn.BatchNorm2d(
                self.config.batch_norm_channels, eps=self.config.batch_norm_eps,
                momentum=self.config.batch_norm_momentum, affine=False,
            )
            if self.config.patch_size is not None
            else None
        )
        # The latent -> RGB map of zero-cost previews, when one was fitted (`vaegan.autoencoder.preview`); not a
        # tensor of the state dict: `vaegan.save` stores it beside the weights, where diffusers ignores it.
        self.latent_preview: LatentPreview | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> AutoencoderKL:
        return cls(preset(name, **overrides))

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> Gaussian parameters (B, 2C, H/f, W/f): mean, then unclamped log-variance.

        A plain tensor, unlike `encode`'s posterior, so `torch.compile` can trace it in the frozen codec.
        """
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of the downsampling factor -> posterior."""
        return DiagonalGaussian.from_moments(self.moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, h, w) -> images (B, 3, h*f, w*f), nominally in [-1, 1] (not clamped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv weight: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def weights_sha256(vae: AutoencoderKL) -> str:
    """sha256 over the state dict (diffusers names, sorted, as fp32): one weights, one hash, in any file format."""
    digest = hashlib.sha256()
    for key, tensor in sorted(vae.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()
