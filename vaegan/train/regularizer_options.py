"""The options of the four diffusability regularisers, one typed group each: `--model.eq.weight 0.1`, or in YAML

    model:
      eq: {weight: 0.1, start: 1000, ramp: 500}

Every group switches its term on with `weight` > 0 and schedules it in batches with `start`, `ramp` and `end`
(`vaegan.train.regularizers.term_schedule`). Configs and checkpoints written before the groups existed name the
options flat (`eq_weight`, `align_backbone`, ...): `migrate_flat_options` moves them into their groups.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from vaegan.pretrained.vision import VisionBackbone


@dataclass(frozen=True, kw_only=True)
class Regularizer:
    """The weight and schedule every regulariser has.

    Args:
        weight: the term's weight (0: off).
        start: batch from which it is on.
        ramp: batches over which it rises from 0 to its weight after `start` (and falls after `end`).
        end: batch from which it switches off again (None: never).
    """

    weight: float = 0.0
    start: int = 0
    ramp: int = 0
    end: int | None = None

    @classmethod
    def of(cls, value: Regularizer | dict | None) -> Regularizer:
        """The options as given: an instance, the dict a checkpoint or `load_from_checkpoint` holds, or None."""
        if value is None:
            return cls()
        return value if isinstance(value, cls) else cls(**value)

    def check(self, name: str) -> None:
        """Refuse settings that cannot work, before any batch runs (`name`: the group's option name)."""
        if self.start < 0 or self.ramp < 0 or (self.end is not None and self.end < self.start):
            raise ValueError(f"{name}: the schedule needs 0 <= {name}.start <= {name}.end and {name}.ramp >= 0, "
                             f"got start {self.start}, ramp {self.ramp}, end {self.end}")


@dataclass(frozen=True, kw_only=True)
class Equivariance(Regularizer):
    """EQ-VAE's equivariance term d(D(τ·z), τ·x), d being the pixel loss plus the weighted LPIPS.

    Args:
        probability: chance per batch that the term is applied (0.5 in EQ-VAE, whose code trains on the
            transformed pair *instead of* the plain one on those batches; here it is added beside it).
        min_scale: τ's downscale s is drawn from [min_scale, 1).
        scale: τ includes a downscale.
        rotate: τ includes a 90° rotation (with `scale`, as in EQ-VAE).
    """

    probability: float = 0.5
    min_scale: float = 0.25
    scale: bool = True
    rotate: bool = True

    def check(self, name: str) -> None:
        super().check(name)
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"{name}.probability={self.probability} must be in [0, 1]")
        if not 0.0 < self.min_scale < 1.0:
            raise ValueError(f"{name}.min_scale={self.min_scale} must be in (0, 1)")
        if self.weight > 0 and not (self.scale or self.rotate):
            raise ValueError(f"{name}.weight > 0 needs {name}.scale or {name}.rotate")


@dataclass(frozen=True, kw_only=True)
class ScaleEquivariance(Regularizer):
    """Scale equivariance, d(D(↓z), ↓x), every batch.

    Args:
        factors: the downsampling factors ↓ is drawn from.
    """

    factors: tuple[int, ...] = (2, 4)

    def check(self, name: str) -> None:
        super().check(name)
        if self.weight > 0 and (not self.factors or min(self.factors) < 2):
            raise ValueError(f"{name}.factors={self.factors} must be downsampling factors of at least 2")


@dataclass(frozen=True, kw_only=True)
class LatentNoise(Regularizer):
    """Latent noise, d(D(z + σ·ε), x).

    Args:
        sigma: σ = |N(0, sigma²)| times the image's latent std.
    """

    sigma: float = 0.3

    def check(self, name: str) -> None:
        super().check(name)
        if self.weight > 0 and self.sigma <= 0:
            raise ValueError(f"{name}.sigma={self.sigma} must be positive")


@dataclass(frozen=True, kw_only=True)
class Alignment(Regularizer):
    """VA-VAE's alignment of the latents to a frozen vision model (`weight` 0.1 in VA-VAE, multiplying the
    adaptive weight).

    Args:
        backbone: the vision model (DINOv2 needs `timm`; AlexNet, SqueezeNet and VGG16 use the LPIPS weight files);
            its weights are looked up as `vaegan.pretrained.vision` describes, a missing file stops the run.
        weights_file: the backbone's weights; else `$VAEGAN_WEIGHTS_DIR`, else the hub/torchvision cache.
        allow_random_backbone: permit a random backbone when no weights exist (only for smoke tests).
        image_size: images are resized to this side for the backbone (224: DINOv2's 16x16 patch grid).
        margin_cosine: VA-VAE's margin m1.
        margin_distance: VA-VAE's margin m2.
        center_features: align to the features minus the batch's mean feature (see
            `vaegan.train.regularizers.vf_loss`): for the CNN backbones, whose ReLU features share one direction
            that the projection's bias alone matches.
        adaptive: weigh the alignment against the reconstruction's gradient at the encoder's last layer
            (VA-VAE); else `weight` is the weight.
        lr: learning rate of the 1x1 projection (default: the model's `lr`). A fresh projection beside a trained
            VAE (a short fine-tune) needs a larger one to line up before its gradient says much to the encoder.
    """

    backbone: VisionBackbone = "dinov2_vitl14"
    weights_file: str | None = None
    allow_random_backbone: bool = False
    image_size: int = 224
    margin_cosine: float = 0.5
    margin_distance: float = 0.25
    center_features: bool = False
    adaptive: bool = True
    lr: float | None = None


# The option groups of `VAEGAN`, by option name.
GROUPS: dict[str, type[Regularizer]] = {
    "eq": Equivariance, "se": ScaleEquivariance, "noise": LatentNoise, "align": Alignment,
}
# Flat names whose group field is not simply the rest of the name.
_RENAMED_FLAT_KEYS = {"allow_random_align_backbone": ("align", "allow_random_backbone")}


def flat_key_target(key: str) -> tuple[str, str] | None:
    """(group, field) of a flat option name from before the groups (`eq_weight` -> ("eq", "weight")), else None."""
    if key in _RENAMED_FLAT_KEYS:
        return _RENAMED_FLAT_KEYS[key]
    group, _, field = key.partition("_")
    if group in GROUPS and field in {f.name for f in dataclasses.fields(GROUPS[group])}:
        return group, field
    return None


def migrate_flat_options(options: dict[str, Any], origin: str) -> dict[str, Any]:
    """`options` (a model's init arguments) with the flat regulariser keys moved into their groups, and one
    warning naming `origin` (a file or the command line) and the keys; unchanged when there are none."""
    moved = [key for key in options if flat_key_target(key)]
    if not moved:
        return options
    migrated = {key: value for key, value in options.items() if key not in moved}
    for key in moved:
        group, field = flat_key_target(key)
        migrated[group] = {**(migrated.get(group) or {}), field: options[key]}
    warn_flat_options(moved, origin)
    return migrated


def warn_flat_options(keys: list[str], origin: str) -> None:
    """One warning for the flat option names `keys` (or `--model.KEY`) that `origin` used."""
    prefix = "--model." if keys[0].startswith("--model.") else ""
    grouped = [prefix + ".".join(flat_key_target(key.removeprefix(prefix))) for key in keys]
    warnings.warn(f"{origin}: the regulariser options are grouped now; read {', '.join(keys)} as "
                  f"{', '.join(grouped)} (write them so to silence this)", FutureWarning, stacklevel=3)
