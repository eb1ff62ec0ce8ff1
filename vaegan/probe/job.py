"""What one `vaegan probe` run is: its options, declared once as the fields of `ProbeJob`, and the settings its
results depend on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from vaegan.pretrained.features import FeatureNetwork


@dataclass(frozen=True, kw_only=True)
class ProbeJob:
    """Train one small diffusion transformer per VAE on its latents, and compare how well each learns.

    The transformers are alike (flow matching, same seed and budget) and see one image set; compared are the
    validation loss at fixed timesteps over training, samples decoded by each VAE, and a distance between those
    samples and the real images. Writes summary.json, results.md, curves.png,
    samples/ and report.html into `output`; rerun the same command to resume after an interruption.

    Args:
        models: VAEs in any format `vaegan.load` reads, as PATH or LABEL=PATH (the label names it in the report).
            The same path may appear under two labels (e.g. with `scramble`).
        output: folder for everything the run writes; the same folder resumes, and a later run into it may add
            VAEs or seeds (the other options must stay the same).
        data: the image set: "demo" (crops of the photos bundled with scikit-image, written to output/images), an
            image folder (recursive; class labels are the first subfolder) or a datasets source.
        resolution: images are encoded as centre crops of this side (shorter side resized).
        scramble: labels of models whose latents are multiplied by a fixed random +-1 pattern (one sign per
            latent element, the same for every image) before training, and by it again before decoding: the
            reconstructions are those of the VAE, the latent space is deliberately harder to learn.
        class_conditional: condition the probe on class labels (the images' first subfolder), with label dropout
            for classifier-free guidance; else unconditional.
        seeds: one probe per seed and VAE; the ranking of VAEs is reported for each seed.
        steps: optimizer steps per probe.
        batch_size: latents per step.
        patch_size: latent patch side per token (2 for f8 latents at 256^2 in DiT; 1 for f16).
        width: token width (DiT-B: 768).
        depth: transformer blocks (DiT-B: 12).
        heads: attention heads (DiT-B: 12).
        mlp_ratio: MLP hidden width over token width.
        lr: AdamW learning rate (DiT: 1e-4 at batch 256; higher suits the small CPU model).
        lr_warmup: steps of linear learning-rate warm-up.
        weight_decay: AdamW weight decay (DiT: 0).
        grad_clip: gradient norm clip (None: no clipping).
        ema_decay: decay of the EMA of the weights that is validated and sampled (warmed up over the first
            steps); DiT's 0.9999 suits 400k steps, not a few thousand.
        label_dropout: share of labels replaced by "no class" during training (class-conditional only).
        posterior: train on posterior samples (as DiT does) or on the posterior mean.
        normalization: "measured": zero mean and unit variance measured on the training latents, so every probe
            sees data of one scale; "declared": the VAE's scaling and shift factors as they are.
        val_fraction: share of the images held out for the validation loss (every n-th image).
        val_every: steps between validation measurements (the curve).
        val_timesteps: the fixed timesteps (0: data, 1: noise) the validation loss is measured at.
        checkpoint_every: steps between checkpoints; a resumed run repeats at most this many.
        samples: generated images per probe for the distance (and the first 64 in the grid).
        sampling_steps: Euler steps per sample.
        cfg_scale: classifier-free guidance scale for class-conditional sampling (1: none).
        distance: feature network of the distance: auto (Inception, i.e. FID, when its weights are found, else
            AlexNet), inception, alex or squeeze.
        inception_weights: Inception-v3 weights for FID (see `vaegan eval`).
        split: split of a datasets source.
        image_column: image column of a datasets source.
        device: cpu, cuda ...; default: cuda when available.
        precision: Lightning precision of probe training (32-true; bf16-mixed on recent GPUs).
        encode_batch_size: images per VAE forward pass when encoding and decoding.
        num_workers: image-decoding processes of the encoding (0: in this process).
        preset: architecture preset for model files that carry no config.
        progress: progress bars and a summary per probe.
    """

    models: list[str]
    output: str
    data: str = "demo"
    resolution: int = 64
    scramble: list[str] = field(default_factory=list)
    class_conditional: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 2000
    batch_size: int = 32
    patch_size: int = 2
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    lr: float = 3e-4
    lr_warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    posterior: Literal["sample", "mean"] = "sample"
    normalization: Literal["measured", "declared"] = "measured"
    val_fraction: float = 0.1
    val_every: int = 100
    val_timesteps: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    checkpoint_every: int = 100
    samples: int = 500
    sampling_steps: int = 25
    cfg_scale: float = 1.0
    distance: FeatureNetwork = "auto"
    inception_weights: str | None = None
    split: str = "train"
    image_column: str = "image"
    device: str | None = None
    precision: str = "32-true"
    encode_batch_size: int = 64
    num_workers: int = 0
    preset: str | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "models", [str(model) for model in self.models])
        object.__setattr__(self, "seeds", [int(seed) for seed in self.seeds])
        object.__setattr__(self, "val_timesteps", tuple(float(t) for t in self.val_timesteps))
        if not self.seeds:
            raise ValueError("give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if min(self.steps, self.batch_size, self.val_every, self.checkpoint_every, self.samples) < 1:
            raise ValueError("steps, batch_size, val_every, checkpoint_every and samples must be at least 1")
        if any(not 0 <= t <= 1 for t in self.val_timesteps):
            raise ValueError(f"val_timesteps {self.val_timesteps} must lie in [0, 1]")


# Options that say which VAEs and seeds to probe; each probe's results are kept per label and seed, so a later run
# into the same folder may add VAEs or seeds (a label must keep its VAE and its scrambling: `run.claim_label`).
SELECTION = ("models", "seeds", "scramble")


def job_settings(job: ProbeJob) -> dict[str, Any]:
    """What the results depend on.

    (A function rather than a method: the command line builds `ProbeJob` from its fields, and would take a public
    method for a subcommand.)
    """
    excluded = {"output", "progress", "device", "encode_batch_size", "num_workers"}
    return {key: value for key, value in dataclasses.asdict(job).items() if key not in excluded}
