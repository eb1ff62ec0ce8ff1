"""Training the diffusion probe on one VAE's latents: the Lightning module, its batches, and resuming.

Every random draw of a run comes from a generator seeded by (seed, step, purpose) (`seeded_generator`): the
training batch of step k (which latents, their posterior sample, the noise, the timesteps, the dropped labels) is a
function of k alone, and so are the validation noise and the samples. A run killed at any moment and resumed
from its last checkpoint therefore continues with exactly the batches the uninterrupted run would have seen,
and ends with the same weights. Checkpoints are written beside their final name and renamed into place, so a
kill never leaves half a checkpoint.

Read `training_step` (one flow-matching regression) and `on_train_batch_end` (EMA, then the fixed-timestep
validation when due, then the checkpoint when due) top to bottom.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from vaegan.formats.checkpoints import check_complete
from vaegan.probe.dit import DiT
from vaegan.probe.flow import euler_sample, flow_matching_loss, guided, interpolate
from vaegan.train.checkpoint_io import WholeCheckpointIO
from vaegan.utils.seeds import seeded_generator

CHECKPOINT_NAME = "last.ckpt"
VALIDATION_BATCH = 256
VALIDATION_SEED = 0


@dataclass
class ProbeLatents:
    """Latents in the space the probe trains on (normalised, perhaps scrambled), one row per image."""

    mean: torch.Tensor  # (N, C, h, w)
    std: torch.Tensor | None  # (N, C, h, w) the posterior's standard deviation, None to train on the mean
    labels: torch.Tensor  # (N,) int64 class indices (all 0 when unconditional)
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> ProbeLatents:
        index = torch.as_tensor(indices, dtype=torch.long)
        return ProbeLatents(self.mean[index], None if self.std is None else self.std[index], self.labels[index],
                            [self.ids[i] for i in indices])


class StepBatches(IterableDataset):
    """Training batches by step number, from `start` to `stop`: batch k is drawn with `seeded_generator(seed, k, ...)`.

    Items are drawn uniformly with replacement (no epoch whose position a resume would have to find); a
    posterior sample is drawn when `latents.std` is set; labels are replaced by `null_label` with probability
    `label_dropout` (classifier-free guidance training).
    """

    def __init__(self, latents: ProbeLatents, batch_size: int, seed: int, start: int, stop: int,
                 label_dropout: float = 0.0, null_label: int = 0):
        self.latents, self.batch_size, self.seed = latents, batch_size, seed
        self.start, self.stop = start, stop
        self.label_dropout, self.null_label = label_dropout, null_label

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        latents, size = self.latents, (self.batch_size,)
        index = torch.randint(len(latents), size, generator=seeded_generator(self.seed, step, "batch"))
        x0 = latents.mean[index]  # (B, C, h, w)
        if latents.std is not None:
            noise = torch.randn(x0.shape, generator=seeded_generator(self.seed, step, "posterior"))
            x0 = x0 + latents.std[index] * noise
        labels = latents.labels[index]
        if self.label_dropout > 0:
            dropped = torch.rand(size, generator=seeded_generator(self.seed, step, "labels")) < self.label_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_label), labels)
        return {
            "x0": x0,
            "noise": torch.randn(x0.shape, generator=seeded_generator(self.seed, step, "noise")),  # (B, C, h, w)
            "t": torch.rand(size, generator=seeded_generator(self.seed, step, "time")),  # (B,) uniform in [0, 1)
            "labels": labels,
        }

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batch(step)


class ProbeModule(L.LightningModule):
    """A DiT trained by flow matching on one VAE's latents, validated at fixed timesteps as it trains.

    The options mean what `vaegan.probe.run.ProbeJob` documents; `latent_shape` and `num_classes` come from the
    encoded data. `checkpoint_path` (not a hyperparameter) is where `on_train_batch_end` saves.
    """

    def __init__(
        self,
        latent_shape: tuple[int, int, int],
        num_classes: int = 0,
        patch_size: int = 2,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        lr: float = 3e-4,
        lr_warmup: int = 100,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        seed: int = 0,
        steps: int = 2000,
        val_every: int = 100,
        val_timesteps: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
        checkpoint_every: int = 100,
        checkpoint_path: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["checkpoint_path"])
        self.checkpoint_path = checkpoint_path
        channels = latent_shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights depend on the seed alone
            self.model = DiT(channels, patch_size, width, depth, heads, mlp_ratio, num_classes)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.validation: dict[str, torch.Tensor] | None = None  # fixed latents and noise, see set_validation
        self.curve: list[dict[str, Any]] = []  # validation losses over training; saved in the checkpoint

    # ---- training ----

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, labels if self.hparams.num_classes else None)

    def training_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> torch.Tensor:
        x0, noise, t = batch["x0"], batch["noise"], batch["t"]
        predicted = self(interpolate(x0, noise, t), t, batch["labels"])
        loss = flow_matching_loss(predicted, x0, noise).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        warmup = max(1, self.hparams.lr_warmup)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.global_step == 0 and not self.curve:
            self.curve.append(self.measure())  # the untrained model: the curve's first point

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
        self._update_ema()
        step = self.global_step
        if step % self.hparams.val_every == 0 or step == self.hparams.steps:
            self.curve.append(self.measure())
            self.log_dict({f"val/{key}": value for key, value in self.curve[-1].items() if key != "step"},
                          prog_bar=False)
        if self.checkpoint_path and (step % self.hparams.checkpoint_every == 0 or step == self.hparams.steps):
            self.trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # with the optimizer: resumable

    @torch.no_grad()
    def _update_ema(self) -> None:
        updates = self.global_step
        decay = min(self.hparams.ema_decay, (1 + updates) / (10 + updates))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)

    # ---- validation at fixed timesteps ----

    def set_validation(self, latents: ProbeLatents) -> None:
        """Held-out latents, drawn as training draws them (one fixed posterior sample each, when training samples
        the posterior), and one fixed noise draw per item and timestep: the same for every seed, so that seeds
        differ only in the probe's own randomness."""
        seed = VALIDATION_SEED
        x0 = latents.mean
        if latents.std is not None:
            x0 = x0 + latents.std * torch.randn(x0.shape, generator=seeded_generator(seed, 0, "validation-posterior"))
        shape = (len(self.hparams.val_timesteps), *latents.mean.shape)
        self.validation = {
            "x0": x0,
            "labels": latents.labels,
            "noise": torch.randn(shape, generator=seeded_generator(seed, 0, "validation")),  # (T, M, C, h, w)
        }

    @torch.no_grad()
    def measure(self) -> dict[str, Any]:
        """The EMA model's flow-matching loss on the validation latents at each fixed timestep, and their mean."""
        if self.validation is None:
            raise RuntimeError("call set_validation before training")
        losses = {}
        for position, value in enumerate(self.hparams.val_timesteps):
            total = 0.0
            for start in range(0, len(self.validation["x0"]), VALIDATION_BATCH):
                part = slice(start, start + VALIDATION_BATCH)
                x0 = self.validation["x0"][part].to(self.device)
                noise = self.validation["noise"][position, part].to(self.device)
                labels = self.validation["labels"][part].to(self.device)
                t = torch.full((len(x0),), value, device=self.device)
                predicted = self.ema(interpolate(x0, noise, t), t, labels if self.hparams.num_classes else None)
                total += flow_matching_loss(predicted, x0, noise).sum().item()
            losses[f"loss_t{value:g}"] = total / len(self.validation["x0"])
        return {"step": self.global_step, "loss": float(np.mean(list(losses.values()))), **losses}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["probe_curve"] = self.curve

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.curve = list(checkpoint.get("probe_curve", []))

    # ---- sampling ----

    @torch.no_grad()
    def sample(self, count: int, labels: torch.Tensor | None, steps: int, cfg_scale: float, seed: int,
               batch_size: int = 256) -> torch.Tensor:
        """`count` latents (count, C, h, w) from the EMA model, Euler-integrated from noise seeded by `seed`."""
        shape = tuple(self.hparams.latent_shape)
        noise = torch.randn((count, *shape), generator=seeded_generator(seed, 0, "sampling"))
        samples = []
        for start in range(0, count, batch_size):
            part = noise[start:start + batch_size].to(self.device)
            conditional = labels[start:start + batch_size].to(self.device) if self.hparams.num_classes else None
            velocity = guided(self.ema, conditional, self.hparams.num_classes, cfg_scale)
            samples.append(euler_sample(velocity, part, steps).float().cpu())
        return torch.cat(samples)


def checkpoint_step(path: Path) -> int:
    """The number of optimizer steps a probe checkpoint holds (0 when there is none)."""
    if not path.is_file():
        return 0
    check_complete(path)
    # Memory-mapped: only the step is read here; the weights are read once, by whoever resumes from the file.
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def fit(module: ProbeModule, train: ProbeLatents, batch_size: int, label_dropout: float, *,
        accelerator: str, precision: str, grad_clip: float | None, progress: bool,
        callbacks: list[L.Callback] | None = None) -> ProbeModule:
    """Train `module` for its `steps`, resuming from its checkpoint when one exists (`callbacks`: extra Lightning
    callbacks, e.g. a benchmark's timer)."""
    checkpoint = Path(module.checkpoint_path)
    start = checkpoint_step(checkpoint)
    steps = module.hparams.steps
    if start >= steps:
        return module.__class__.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True,
                                                  checkpoint_path=str(checkpoint))
    batches = StepBatches(train, batch_size, module.hparams.seed, start, steps, label_dropout,
                          null_label=module.hparams.num_classes)
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, accelerator=accelerator, devices=1, precision=precision,
        gradient_clip_val=grad_clip, logger=False, enable_checkpointing=False, plugins=[WholeCheckpointIO()],
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        # The batches are drawn from latents in memory; worker processes would only add start-up time.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, DataLoader(batches, batch_size=None, num_workers=0),
                    ckpt_path=checkpoint if start else None)
    return module
