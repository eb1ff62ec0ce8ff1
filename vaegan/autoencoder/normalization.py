"""How latents are normalised for a diffusion model, and back: the one place that knows the formulas.

A diffusion model trains on normalised latents, which pipelines turn back into the VAE's raw latents z before
decoding. The field uses three conventions, all computed here:

  scalar   z_model = (z - shift_factor) * scaling_factor                    SD, SDXL (shift 0), SD3, Flux.1
  channel  z_model = (z - latents_mean[c]) * scaling_factor / latents_std[c]  diffusers' latents_mean/latents_std
  patch    z_model = (patchify(z) - running_mean[c]) / sqrt(running_var[c] + eps)                        FLUX.2

where patchify folds each 2x2 block of latent pixels into channels, (B, C, h, w) -> (B, 4C, h/2, w/2), the shape
FLUX.2's transformer consumes. A VAE declares its kind: FLUX.2's carries the running statistics as `bn.*`
buffers, a diffusers config may carry latents_mean/latents_std, every other VAE has the scalar factors. The
codec, dataset encoding (and the manifest and shard metadata it records), `LatentDataset`, `vaegan decode`,
evaluation, training validation and export all go through `LatentNormalization`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange

from vaegan.autoencoder.network import AutoencoderKL
from vaegan.autoencoder.tiny import TinyAutoencoder

Kind = Literal["scalar", "channel", "patch"]
# "shift" (SD3, Flux): zero mean and unit variance; "scale" (SD 1.x, SDXL): shift 0, unit variance of z / std.
Convention = Literal["shift", "scale"]
# FLUX.2 folds 2x2 latent pixels into channels before normalising.
DEFAULT_PATCH_SIZE = (2, 2)


def patchify(z: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C*p*q, h/p, w/q), channel-major as FLUX.2's pipeline folds them."""
    p, q = patch_size
    if z.shape[-2] % p or z.shape[-1] % q:
        raise ValueError(f"latents of shape {tuple(z.shape)} do not split into {p}x{q} patches: the image's sides "
                         f"must be multiples of the downsampling factor times {p}")
    return rearrange(z, "b c (h p) (w q) -> b (c p q) h w", p=p, q=q)


def unpatchify(latents: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """The inverse of `patchify`."""
    p, q = patch_size
    return rearrange(latents, "b (c p q) h w -> b c (h p) (w q)", p=p, q=q)


@dataclass(frozen=True)
class LatentNormalization:
    """One of the three normalisations of the module doc, and its inverse."""

    kind: Kind = "scalar"
    scaling_factor: float = 1.0  # scalar and channel
    shift_factor: float = 0.0  # scalar
    mean: tuple[float, ...] | None = None  # channel: latents_mean (C,); patch: running_mean (C*p*q,)
    std: tuple[float, ...] | None = None  # channel: latents_std (C,); patch: sqrt(running_var + eps) (C*p*q,)
    patch_size: tuple[int, int] | None = None  # patch

    def __post_init__(self):
        if self.kind not in ("scalar", "channel", "patch"):
            raise ValueError(f"unknown latent normalisation {self.kind!r}; choose scalar, channel or patch")
        per_channel = self.kind != "scalar"
        if per_channel != (self.mean is not None and self.std is not None):
            raise ValueError(f"a {self.kind} normalisation {'needs' if per_channel else 'takes no'} mean and std")
        if (self.kind == "patch") != (self.patch_size is not None):
            raise ValueError("patch_size goes with the patch normalisation, and only with it")
        if per_channel and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        if per_channel and min(self.std) <= 0:
            raise ValueError("every channel's std must be positive")

    # ---- where a normalisation comes from ----

    @classmethod
    def of(cls, vae: AutoencoderKL | TinyAutoencoder) -> LatentNormalization:
        """The normalisation a VAE declares: its `bn` statistics (FLUX.2), else latents_mean/latents_std, else
        its scalar factors (a missing shift is 0, as diffusers reads it); for a tiny autoencoder, none beyond
        its teacher's patch layout."""
        config = vae.config
        if isinstance(vae, TinyAutoencoder):
            # Its network already speaks the normalised space; only FLUX.2's patch layout is left to apply.
            if config.patch_size is None:
                return cls("scalar", 1.0, 0.0)
            channels = config.latent_channels * config.patch_size[0] * config.patch_size[1]
            return cls("patch", mean=(0.0,) * channels, std=(1.0,) * channels, patch_size=config.patch_size)
        if config.patch_size is not None:
            variance = vae.bn.running_var.detach().double().cpu()
            std = (variance + config.batch_norm_eps).sqrt()
            return cls("patch", mean=_floats(vae.bn.running_mean), std=_floats(std), patch_size=config.patch_size)
        if config.latents_mean is not None:
            return cls("channel", config.scaling_factor, mean=config.latents_mean, std=config.latents_std)
        return cls("scalar", config.scaling_factor, config.shift_factor or 0.0)

    @classmethod
    def fit(
        cls, statistics: LatentStatistics, kind: Kind = "scalar", convention: Convention = "shift",
        patch_size: tuple[int, int] | None = None, eps: float = 1e-4,
    ) -> LatentNormalization:
        """The normalisation that gives latents with these statistics unit variance (and zero mean, except the
        scalar kind's "scale" convention). `statistics` are of what the kind normalises: raw latents for scalar
        and channel, `patchify`d ones for patch (`measured_layout` says which)."""
        if kind == "scalar":
            if convention not in ("shift", "scale"):
                raise ValueError(f"convention must be 'shift' or 'scale', got {convention!r}")
            mean, std = statistics.overall()
            return cls("scalar", 1.0 / std, mean if convention == "shift" else 0.0)
        if kind == "channel":
            return cls("channel", 1.0, mean=_floats(statistics.mean), std=_floats(statistics.channel_std))
        if kind == "patch":
            variance = statistics.channel_std.double() ** 2
            return cls("patch", mean=_floats(statistics.mean), std=_floats((variance + eps).sqrt()),
                       patch_size=tuple(patch_size or DEFAULT_PATCH_SIZE))
        raise ValueError(f"unknown latent normalisation {kind!r}; choose scalar, channel or patch")

    @classmethod
    def from_json(cls, data: dict) -> LatentNormalization:
        """Read what `to_json` wrote (a manifest, a shard's metadata); entries without a kind are scalar."""
        kind = data.get("kind", "scalar")
        return cls(
            kind, data.get("scaling_factor", 1.0), data.get("shift_factor", 0.0),
            mean=tuple(data["mean"]) if kind != "scalar" else None,
            std=tuple(data["std"]) if kind != "scalar" else None,
            patch_size=tuple(data["patch_size"]) if kind == "patch" else None,
        )

    def to_json(self) -> dict:
        if self.kind == "scalar":
            return {"kind": "scalar", "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}
        data = {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}
        if self.kind == "channel":
            return data | {"scaling_factor": self.scaling_factor}
        return data | {"patch_size": list(self.patch_size)}

    def apply_to(self, vae: AutoencoderKL) -> None:
        """Make `vae` declare this normalisation where diffusers pipelines read it: the config's factors, its
        latents_mean/latents_std, or (FLUX.2) the `bn` running statistics."""
        config = vae.config
        if self.kind == "patch":
            if config.patch_size != self.patch_size:
                raise ValueError(f"a {self.patch_size} patch normalisation needs a VAE with bn statistics of that "
                                 f"patch size (FLUX.2's architecture); this one has patch_size={config.patch_size}")
            std = torch.tensor(self.std, dtype=torch.float64)
            with torch.no_grad():
                vae.bn.running_mean.copy_(torch.tensor(self.mean))
                vae.bn.running_var.copy_(std**2 - config.batch_norm_eps)
            return
        if config.patch_size is not None:
            raise ValueError(f"a VAE with FLUX.2's bn statistics declares a patch normalisation, not a {self.kind} one")
        if self.kind == "channel":
            vae.config = config.replace(scaling_factor=self.scaling_factor, shift_factor=0.0,
                                        latents_mean=self.mean, latents_std=self.std)
        else:
            vae.config = config.replace(scaling_factor=self.scaling_factor, shift_factor=self.shift_factor,
                                        latents_mean=None, latents_std=None)

    def rounded(self, digits: int = 5) -> LatentNormalization:
        """The same normalisation with every number rounded, for a config that people read."""
        def values(numbers):
            return None if numbers is None else tuple(round(number, digits) for number in numbers)

        return LatentNormalization(self.kind, round(self.scaling_factor, digits), round(self.shift_factor, digits),
                                   values(self.mean), values(self.std), self.patch_size)

    # ---- the formulas ----

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, h, w) -> what a diffusion model sees: (B, C, h, w), or (B, C*p*q, h/p, w/q)."""
        if self.patch_size is not None:
            z = patchify(z, self.patch_size)
        shift, scale = self._shift_and_scale(z)
        return (z - shift) * scale

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """What a diffusion model sees -> raw latents (B, C, h, w) for the decoder."""
        shift, scale = self._shift_and_scale(latents)
        z = latents / scale + shift
        return z if self.patch_size is None else unpatchify(z, self.patch_size)

    def normalize_logvar(self, logvar: torch.Tensor) -> torch.Tensor:
        """A posterior's log-variance in the normalised space: each channel's variance scales by its scale^2."""
        if self.patch_size is not None:
            logvar = patchify(logvar, self.patch_size)
        _, scale = self._shift_and_scale(logvar)
        return logvar + 2.0 * torch.as_tensor(scale, dtype=logvar.dtype, device=logvar.device).abs().log()

    def channels(self, latent_channels: int) -> int:
        """Channels of the normalised latents of a VAE with `latent_channels`."""
        return latent_channels * (1 if self.patch_size is None else self.patch_size[0] * self.patch_size[1])

    @property
    def spatial_factor(self) -> int:
        """How much smaller the normalised latents' sides are than the VAE's (2 for FLUX.2's patches)."""
        return 1 if self.patch_size is None else self.patch_size[0]

    def _shift_and_scale(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        if self.kind == "scalar":
            return self.shift_factor, self.scaling_factor
        shift = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        if like.shape[1] != shift.shape[1]:
            raise ValueError(f"latents with {like.shape[1]} channels do not fit a {self.kind} normalisation of "
                             f"{shift.shape[1]} channels")
        return shift, (self.scaling_factor if self.kind == "channel" else 1.0) / std

    def __str__(self) -> str:
        if self.kind == "scalar":
            shift = f"+ {-self.shift_factor:g}" if self.shift_factor < 0 else f"- {self.shift_factor:g}"
            return f"(z {shift}) * {self.scaling_factor:g}"
        if self.kind == "channel":
            return f"(z - latents_mean[c]) * {self.scaling_factor:g} / latents_std[c], {len(self.mean)} channels"
        p, q = self.patch_size
        return f"(patchify{p}x{q}(z) - running_mean[c]) / sqrt(running_var[c] + eps), {len(self.mean)} channels"


def measured_layout(z: torch.Tensor, kind: Kind, patch_size: tuple[int, int] | None = None) -> torch.Tensor:
    """What a normalisation of `kind` measures its statistics on: raw latents, or their patches."""
    return patchify(z, patch_size or DEFAULT_PATCH_SIZE) if kind == "patch" else z


def _floats(values) -> tuple[float, ...]:
    return tuple(float(value) for value in torch.as_tensor(values).double().cpu().tolist())


@dataclass
class LatentStatistics:
    """Running per-channel mean and variance of latents (Chan et al.'s parallel update), in float64."""

    count: int = 0
    mean: torch.Tensor | None = None  # (C,)
    m2: torch.Tensor | None = None    # (C,) sum of squared deviations

    def update(self, latents: torch.Tensor) -> None:
        """Add a batch of latents (B, C, h, w)."""
        values = latents.detach().double().transpose(0, 1).flatten(1)  # (C, N)
        batch_mean = values.mean(dim=1)
        batch_m2 = ((values - batch_mean[:, None]) ** 2).sum(dim=1)
        self.merge(LatentStatistics(values.shape[1], batch_mean, batch_m2))

    def merge(self, other: LatentStatistics) -> None:
        """Fold in statistics gathered elsewhere (another batch, another rank)."""
        if other.mean is None:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * other.count / total
        self.m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / total
        self.count = total

    @property
    def channel_std(self) -> torch.Tensor:
        return (self.m2 / max(self.count - 1, 1)).sqrt()

    def overall(self) -> tuple[float, float]:
        """Mean and standard deviation over all channels pooled together."""
        mean = self.mean.mean()
        pooled_m2 = self.m2.sum() + (self.count * (self.mean - mean) ** 2).sum()
        std = (pooled_m2 / max(self.count * self.mean.numel() - 1, 1)).sqrt()
        return mean.item(), std.item()
