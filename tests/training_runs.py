"""Short `vaegan fit` runs in their own processes, which tests kill, starve of disk and resume."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

# 22 photos in batches of 4: epochs of 6 batches (the last one of 2), a validation and checkpoint every 3
# batches, 12 batches in all. The discriminator trains from batch 4 and its weight ramps up until batch 7; the
# learning rates warm up for 3 batches, then decay; the EMA warms up throughout.
PHOTOS, BATCHES, CHECKPOINT_EVERY = 22, 12, 3

# Loaded by the `vaegan fit` processes from their run folder, which is put on their PYTHONPATH.
CALLBACKS = '''
import os, resource, signal
import lightning as L


class KillAt(L.Callback):
    """kill -9 the run, every rank and data worker of it, once batch `batch` has trained."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if int(module.batches_seen) == self.batch:
            os.killpg(os.getpgrp(), signal.SIGKILL)


class FileSizeLimitFrom(L.Callback):
    """From batch `batch` on, writes that would grow a file past `limit` bytes fail (EFBIG), as on a full disk."""

    def __init__(self, batch: int, limit: int):
        self.batch, self.limit = batch, limit

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if int(module.batches_seen) == self.batch:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.RLIM_INFINITY))
'''


def fit(run: Path, photos: tuple[Path, Path], *options: str, callbacks: tuple[dict, ...] = (), devices: int = 1,
        workers: int = 0, precision: str = "32-true", model: dict | None = None) -> subprocess.CompletedProcess:
    """`vaegan fit` as a user runs it, in its own process group, writing into `run`; `model` overrides the
    model's settings."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "resume_callbacks.py").write_text(CALLBACKS)
    config = {
        "seed_everything": 0,
        "model": dict(arch="mini", perceptual_net="squeeze", perceptual_weight=0.5, disc_start=4, disc_warmup=3,
                      disc_channels=16, disc_layers=2, lr=1e-3, disc_lr=2e-4, lr_warmup=3, lr_schedule="cosine",
                      ema_decay=0.9, max_batches=BATCHES, grid_images=2) | (model or {}),
        "data": dict(source=str(photos[0]), val_source=str(photos[1]), resolution=32, min_size=32,
                     batch_size=4 // devices, num_workers=workers),
        "trainer": dict(
            accelerator="cpu", devices=devices, strategy="gan_ddp" if devices > 1 else "auto", precision=precision,
            val_check_interval=CHECKPOINT_EVERY, check_val_every_n_epoch=None, limit_val_batches=1,
            num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
            logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run)}},
            callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True}}, *callbacks],
        ),
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    python_path = os.pathsep.join([str(run), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "vaegan.cli", "fit", "--config", str(run / "config.yaml"), *options],
        cwd=run, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path},
        capture_output=True, text=True, timeout=600, start_new_session=True,
    )


def kill_at(batch: int) -> dict:
    return {"class_path": "resume_callbacks.KillAt", "init_args": {"batch": batch}}


def last_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def batches_of(checkpoint: dict) -> int:
    return int(checkpoint["state_dict"]["batches_seen"])


def resume(run: Path, photos, **options) -> dict:
    """Resume `run` from its last checkpoint to the end; its final checkpoint."""
    resumed = fit(run, photos, "--ckpt_path", "last", **options)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr
    assert "not resumable" not in resumed.stderr  # Lightning's warning for a loader without a saved place
    return last_checkpoint(run)
