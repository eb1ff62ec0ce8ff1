"""The training module end to end with real Lightning, real LPIPS and real photos (BSDS500)."""

import math
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

import vaegan
from vaegan.train.data import ImageDataModule
from vaegan.train.module import VAEGAN
from vaegan.train.regularizer_options import Alignment, Equivariance, LatentNoise, ScaleEquivariance

from conftest import bsds_photos

ROOT = Path(__file__).resolve().parents[2]

FAST = dict(
    arch="mini", perceptual_net="squeeze", perceptual_weight=0.5, lr=1e-3, disc_lr=2e-4, lr_warmup=10,
    disc_channels=16, disc_layers=2, grid_images=4,
)


def make_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu", max_epochs=-1, max_steps=-1, logger=CSVLogger(tmp_path / "logs"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=5,
    )
    return L.Trainer(**{**options, **kwargs})


class Watchdog(L.Callback):
    """Checks, at every optimizer step, that each network only ever receives its own gradients."""

    def __init__(self):
        self.steps = {"generator": 0, "discriminator": 0}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        perceptual = list(module.perceptual.parameters())
        assert not module.perceptual.training and all(p.grad is None for p in perceptual)
        vae_grads = [p.grad for p in module.vae.parameters()]
        disc_grads = [p.grad for p in module.discriminator.parameters()]
        if optimizer is module.optimizers()[0].optimizer:
            assert all(g is None for g in disc_grads), "generator loss leaked into the discriminator"
            assert any(g is not None for g in vae_grads)
            self.steps["generator"] += 1
        else:
            assert all(g is None for g in vae_grads), "discriminator loss leaked into the autoencoder"
            assert all(g is not None for g in disc_grads)
            self.steps["discriminator"] += 1


@pytest.mark.slow
def test_short_run_on_real_photos_improves_psnr_and_gates_the_discriminator(assets, tmp_path):
    L.seed_everything(0)
    data = ImageDataModule(
        source=str(bsds_photos(assets, tmp_path, "train", 48, corrupt=True)),
        val_source=str(bsds_photos(assets, tmp_path, "test", 8)),
        resolution=64, batch_size=8, num_workers=0, min_size=64,
    )
    module = VAEGAN(**FAST, disc_start=100, disc_warmup=20, ema_decay=0.95, max_batches=160)
    watchdog = Watchdog()
    # Validated before and after, not every 6-batch epoch in between (the epochs are short; it would double the
    # test's time).
    trainer = make_trainer(tmp_path, callbacks=[watchdog], check_val_every_n_epoch=1000)
    before = trainer.validate(module, data, verbose=False)[0]
    initial_disc = {k: v.clone() for k, v in module.discriminator.state_dict().items()}
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]

    print(f"held-out PSNR {before['val/psnr']:.2f} -> {after['val/psnr']:.2f} dB, "
          f"SSIM {before['val/ssim']:.3f} -> {after['val/ssim']:.3f}")
    assert after["val/psnr"] > before["val/psnr"] + 4.0
    assert after["val/ssim"] > before["val/ssim"]
    assert after["val/lpips_squeeze"] < before["val/lpips_squeeze"]
    # Counted in batches: 160 generator steps, discriminator steps only from batch 100 on.
    assert int(module.batches_seen) == 160
    assert watchdog.steps == {"generator": 160, "discriminator": 60}
    assert trainer.global_step == 220  # what Lightning counts: every optimizer step
    assert any(not torch.equal(initial_disc[k], v) for k, v in module.discriminator.state_dict().items())
    assert module.logvar.item() != 0.0, "the log-variance must really be optimized"
    assert "corrupt.jpg" in " ".join(data.skipped), "the bad file is skipped and counted"
    grids = sorted(Path(trainer.log_dir).glob("grids/*.png"))
    assert grids, "validation writes reconstruction grids"
    # input | reconstruction | error | latent preview: the trained latents' linear preview shows the image, closer
    # to it than a flat grey guess.
    grid = np.asarray(Image.open(grids[-1])).astype(float)
    assert grid.shape[1] == 4 * 64 + 3 * 4
    inputs, previews = grid[:64, :64], grid[:64, 3 * 68:3 * 68 + 64]
    assert np.mean((previews - inputs) ** 2) < np.mean((inputs.mean() - inputs) ** 2)
    assert 0.0 < after["val/suggested_scaling_factor"] < 100.0


def _run(tmp_path: Path, data_folder: Path, max_epochs: int) -> VAEGAN:
    L.seed_everything(0)
    data = ImageDataModule(source=str(data_folder), val_source=str(data_folder), resolution=32,
                           batch_size=4, num_workers=0, min_size=32)
    module = VAEGAN(**FAST, disc_start=2, disc_warmup=2, ema_decay=0.9, max_batches=10_000)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = make_trainer(tmp_path, max_epochs=max_epochs, callbacks=[checkpoints], enable_checkpointing=True,
                           limit_val_batches=0)
    trainer.fit(module, data)
    return module


def test_export_measures_factors_and_writes_a_diffusers_vae(assets, tmp_path):
    folder = bsds_photos(assets, tmp_path, "train", 8)
    _run(tmp_path, folder, max_epochs=1)
    from vaegan.train.export import export

    path = export(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "vae", data=str(folder), resolution=64)
    vae = vaegan.load(path)
    codec = vaegan.Codec(vae)
    latents = codec.encode(torch.stack([torch.rand(3, 64, 64) * 2 - 1 for _ in range(2)]))
    assert vae.config.scaling_factor != 1.0 and (path / "config.json").is_file()
    assert latents.abs().mean() < 10  # normalised, not raw


@pytest.mark.slow
def test_compiled_training_follows_the_eager_run(assets, tmp_path):
    # torch.compile (inductor, on CPU here) through both optimizer steps and the adaptive weight's double
    # differentiation, the discriminator switching on at batch 2: the same updates as eager, up to rounding
    # (which Adam's first steps amplify where a gradient is near zero, so each network's update is compared
    # as a whole).
    folder = bsds_photos(assets, tmp_path, "train", 8)
    initial, modules = {}, {}
    for compile in (False, True):
        L.seed_everything(0)
        data = ImageDataModule(source=str(folder), resolution=32, batch_size=4, num_workers=0, min_size=32)
        module = VAEGAN(**FAST, disc_start=2, disc_warmup=1, ema_decay=0.9, max_batches=4, compile=compile)
        initial[compile] = {name: tensor.clone() for name, tensor in module.state_dict().items()}
        torch._dynamo.utils.counters.clear()
        make_trainer(tmp_path / str(compile), limit_val_batches=0).fit(module, data)
        modules[compile] = module
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert int(modules[True].batches_seen) == 4
    for name, start in initial[False].items():
        torch.testing.assert_close(initial[True][name], start, rtol=0, atol=0)
    assert modules[True].discriminator._compiled_call_impl is not None
    # Measured (encoder, decoder and discriminator compiled): 0.9 % (autoencoder), 0.4 % (discriminator), 0.01 %
    # (log-variance); 1.75 %, 0.49 %, 0.04 % with OMP_NUM_THREADS=1; on an AVX-512 CPU with two threads the
    # discriminator's is 2.4 %. Compiling the discriminator too changes them by under 0.01 % of the update: its
    # gradients equal eager ones to rounding (tests/train/test_compiled_discriminator.py); the rest is the
    # autoencoder's rounding, which reaches the discriminator through the reconstructions, amplified by Adam.
    for network, bound in (("vae.", 0.05), ("discriminator.", 0.05), ("logvar", 0.01)):
        names = [name for name in initial[False] if name.startswith(network)]
        eager, compiled = (
            torch.cat([(modules[c].state_dict()[n].float() - initial[c][n].float()).flatten() for n in names])
            for c in (False, True)
        )
        difference = (compiled - eager).norm() / eager.norm()
        assert difference < bound, f"{network}: compiled updates differ from eager by {difference:.1%}"


# Every regulariser on, their schedules crossing the interruption below: EQ-VAE on half the batches until batch 5,
# scale equivariance throughout, latent noise from batch 1, alignment to AlexNet's features ramped in over 3.
REGULARIZED = dict(
    eq=Equivariance(weight=1.0, end=5), se=ScaleEquivariance(weight=0.5), noise=LatentNoise(weight=0.5, start=1),
    align=Alignment(weight=0.1, ramp=3, backbone="alexnet", image_size=64),
)


def _regularized_run(tmp_path: Path, data_folder: Path, kill_at_batch: int | None = None,
                     resume: Path | None = None, precision: str = "32") -> VAEGAN:
    """Three epochs of two batches; `kill_at_batch` ends the process with SIGKILL when that batch starts."""
    L.seed_everything(0)
    data = ImageDataModule(source=str(data_folder), resolution=32, batch_size=4, num_workers=0, min_size=32)
    module = VAEGAN(**FAST, **REGULARIZED, disc_start=2, disc_warmup=2, ema_decay=0.9, max_batches=10_000)
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)]
    if kill_at_batch is not None:
        callbacks.append(KillAt(kill_at_batch))
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=callbacks, enable_checkpointing=True,
                           limit_val_batches=0, precision=precision, log_every_n_steps=1)
    trainer.fit(module, data, ckpt_path=resume)
    return module


class KillAt(L.Callback):
    """kill -9 of this very process when batch `batch` is about to start: nothing is saved on the way out."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if int(module.batches_seen) == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_a_run_with_every_regularizer_resumes_exactly_after_kill_9(assets, tmp_path):
    folder = bsds_photos(assets, tmp_path, "train", 8)
    uninterrupted = _regularized_run(tmp_path / "a", folder)
    # Killed in the middle of the second epoch: the last checkpoint is the first epoch's (batch 2).
    child = multiprocessing.get_context("spawn").Process(target=_regularized_run, args=(tmp_path / "b", folder, 3))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    checkpoint_path = tmp_path / "b" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert int(checkpoint["state_dict"]["batches_seen"]) == 2
    resumed = _regularized_run(tmp_path / "b", folder, resume=checkpoint_path)

    assert int(resumed.batches_seen) == int(uninterrupted.batches_seen) == 6
    expected, actual = uninterrupted.state_dict(), resumed.state_dict()
    assert "align_projection.weight" in expected and not [key for key in expected if key.startswith("vision.")]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    for mine, theirs in zip(resumed.optimizers()[0].optimizer.state.values(),
                            uninterrupted.optimizers()[0].optimizer.state.values(), strict=True):
        torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"], rtol=0, atol=1e-6)
    # The alignment head is training state, in the checkpoint but not in the VAE that `vaegan.load` reads from it.
    final = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    assert any(key.startswith("align_projection.") for key in final)
    assert not any(key.startswith("vision.") for key in final)
    torch.testing.assert_close(vaegan.load(checkpoint_path).state_dict(), resumed.ema.state_dict())


@pytest.mark.slow
def test_every_regularizer_stays_finite_under_bf16_mixed_and_the_alignment_is_measured(assets, tmp_path):
    folder = bsds_photos(assets, tmp_path, "train", 8)
    module = _regularized_run(tmp_path, folder, precision="bf16-mixed")
    metrics = read_metrics(tmp_path / "logs")
    for name in ("eq", "se", "noise", "align"):
        values = [row[f"train/{name}"] for row in metrics if row.get(f"train/{name}")]
        weights = [row[f"train/{name}_weight"] for row in metrics if row.get(f"train/{name}_weight")]
        assert values and weights, name
        assert all(math.isfinite(float(v)) for v in values + weights), (name, values, weights)
    align_weights = [float(row["train/align_weight"]) for row in metrics if row.get("train/align_weight")]
    assert align_weights[0] > 0  # the adaptive weight, computed in fp32, is a real number, not 0 from a NaN
    assert all(torch.isfinite(p).all() for p in module.vae.parameters())

    # scripts/measure_alignment.py on this run: the checkpoint holds the trained head, its exported VAE (the same
    # EMA weights) none, and the probe fitted on the same images measures both alike.
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    exported = vaegan.save(vaegan.load(checkpoint), tmp_path / "exported")
    held_out = bsds_photos(assets, tmp_path, "test", 4)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "measure_alignment.py"), "--models", f"run={checkpoint}",
         f"export={exported}", "--backbone", "alexnet", "--image-size", "64", "--data", str(held_out),
         "--fit-data", str(folder), "--resolution", "64", "--tile", "32"],
        capture_output=True, text=True, check=True)
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"(mean", "run", "export"}, result.stdout
    run, export = rows["run"], rows["export"]
    assert run[:2] == export[:2] and all(-1 <= float(value) <= 1 for value in run)
    assert export[2:] == ["n/a", "n/a"]


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    import csv

    (path,) = log_dir.glob("**/metrics.csv")
    with path.open() as file:
        return list(csv.DictReader(file))


def test_the_alignment_projection_learns_at_its_own_rate(assets):
    # One optimizer for the autoencoder and the projection, two learning rates; the schedule scales both.
    module = VAEGAN(**FAST, align=Alignment(weight=0.1, backbone="alexnet", image_size=64, lr=1e-2))
    (generator, _), _ = module.configure_optimizers()
    autoencoder, projection = generator.param_groups
    assert autoencoder["initial_lr"] == 1e-3 and projection["initial_lr"] == 1e-2  # before the warm-up's factor
    assert projection["lr"] == 10 * autoencoder["lr"]
    assert {id(p) for p in projection["params"]} == {id(p) for p in module.align_projection.parameters()}
    (generator, _), _ = VAEGAN(**FAST, align=Alignment(weight=0.1, backbone="alexnet", image_size=64)
                               ).configure_optimizers()
    assert [group["initial_lr"] for group in generator.param_groups] == [1e-3, 1e-3]


def test_regularizer_settings_are_checked_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"eq\.probability=1\.5"):
        VAEGAN(**FAST, eq=Equivariance(weight=1.0, probability=1.5))
    with pytest.raises(ValueError, match="train_decoder_only freezes the encoder"):
        VAEGAN(**FAST, align=Alignment(weight=0.1, backbone="alexnet"), train_decoder_only=True)
    with pytest.raises(ValueError, match="se: the schedule"):
        VAEGAN(**FAST, se=ScaleEquivariance(weight=1.0, start=10, end=5))


def test_a_missing_alignment_backbone_stops_the_run_and_names_the_file(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    lpips = str(assets / "lpips" / "squeezenet1_1_features.safetensors")
    with pytest.raises(RuntimeError, match=f"{tmp_path}/alexnet_features.safetensors does not exist"):
        VAEGAN(**FAST, perceptual_weights_file=lpips, align=Alignment(weight=0.1, backbone="alexnet"))
