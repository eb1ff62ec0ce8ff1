"""Training survives anything: `vaegan fit` killed with kill -9 mid-epoch, or stopped by a full disk while writing
a checkpoint, and resumed with `--ckpt_path last` ends bit for bit where an uninterrupted run ends; a checkpoint
write killed halfway leaves the previous one whole; a broken checkpoint is refused by name; a non-finite step is
skipped and counted, and enough of them in a row stop the run with a message."""

import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from training_runs import BATCHES, PHOTOS, batches_of, fit, kill_at, last_checkpoint, resume

import vaegan
from vaegan.cli import main
from vaegan.formats.checkpoints import CheckpointError, check_complete, save_checkpoint
from vaegan.train.data import EpochSampler, ImageDataModule, ResumableLoader
from vaegan.train.module import VAEGAN, TrainingDiverged

from conftest import bsds_photos


@pytest.fixture(scope="module")
def photos(assets, tmp_path_factory) -> tuple[Path, Path]:
    """(training photos, validation photos) from BSDS500."""
    folder = tmp_path_factory.mktemp("photos")
    return bsds_photos(assets, folder, "train", PHOTOS), bsds_photos(assets, folder, "test", 2)


def assert_same_training_state(resumed: dict, expected: dict) -> None:
    """Weights (autoencoder, EMA, discriminator, log-variance), counters, seed, optimizer and scheduler states and
    the training loader's place, bit for bit."""
    assert batches_of(resumed) == batches_of(expected) == BATCHES
    assert resumed["state_dict"].keys() == expected["state_dict"].keys()
    assert {key.split(".")[0] for key in expected["state_dict"]} >= {"vae", "ema", "discriminator", "logvar"}
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert len(expected["optimizer_states"]) == 2 and expected["optimizer_states"][1]["state"]
    torch.testing.assert_close(resumed["optimizer_states"], expected["optimizer_states"], rtol=0, atol=0)
    assert resumed["lr_schedulers"] == expected["lr_schedulers"]
    place = [checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] for checkpoint in (resumed, expected)]
    assert place[0] == place[1]


@pytest.mark.slow
def test_killed_mid_epoch_or_mid_checkpoint_write_then_resumed_equals_the_uninterrupted_run(photos, tmp_path):
    reference = fit(tmp_path / "uninterrupted", photos)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = last_checkpoint(tmp_path / "uninterrupted")

    # kill -9 after batch 11, two data workers reading: the last checkpoint is batch 9's, halfway through the
    # second epoch. The reference read its images without workers: crops do not depend on who decodes them.
    run = tmp_path / "killed"
    killed = fit(run, photos, callbacks=(kill_at(11),), workers=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert batches_of(last_checkpoint(run)) == 9
    assert_same_training_state(resume(run, photos, workers=2), expected)

    # The disk "fills up" in the middle of writing batch 9's checkpoint (from batch 8 on, no file of the run may
    # grow past half a checkpoint): the run stops with one line, and last.ckpt is still batch 6's, which ended
    # the first epoch, whole.
    run = tmp_path / "disk-full"
    size = (tmp_path / "killed" / "checkpoints" / "last.ckpt").stat().st_size
    limit = {"class_path": "resume_callbacks.FileSizeLimitFrom", "init_args": {"batch": 8, "limit": size // 2}}
    stopped = fit(run, photos, callbacks=(limit,))
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    error = stopped.stderr.strip().splitlines()[-1]
    assert error.startswith(f"vaegan fit: error: could not write the checkpoint {run / 'checkpoints'}"), error
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert batches_of(last_checkpoint(run)) == 6
    assert_same_training_state(resume(run, photos), expected)

    # The frozen LPIPS network is not stored (it is rebuilt from its weights file), and the checkpoint is also a
    # VAE that `vaegan.load` reads: the EMA weights by default.
    assert not [key for key in expected["state_dict"] if key.startswith("perceptual.")]
    vae = vaegan.load(run / "checkpoints" / "last.ckpt")
    for key, value in vae.state_dict().items():
        assert torch.equal(value, expected["state_dict"][f"ema.{key}"]), key


# Run in its own process: the kernel kills it (SIGXFSZ, whose default action CPython sets to "ignore") when the
# second write grows the file past half the first checkpoint's size.
KILLED_WRITER = """
import os, resource, signal, sys
import torch
from vaegan.formats.checkpoints import save_checkpoint

path = sys.argv[1]
save_checkpoint({"weights": torch.zeros(1 << 20), "batch": 6}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) // 2, resource.RLIM_INFINITY))
save_checkpoint({"weights": torch.ones(1 << 20), "batch": 9}, path)
"""


def test_a_checkpoint_write_killed_halfway_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr.decode()[-3000:]
    [half_written] = tmp_path.glob(".last.ckpt.*.tmp")
    assert half_written.stat().st_size == path.stat().st_size // 2
    previous = torch.load(path, weights_only=True)
    assert previous["batch"] == 6 and torch.equal(previous["weights"], torch.zeros(1 << 20))
    with pytest.raises(CheckpointError, match=f"{half_written.name} is not a complete checkpoint .* cut short"):
        check_complete(half_written)
    save_checkpoint({"batch": 12}, path)
    assert torch.load(path, weights_only=True) == {"batch": 12}
    assert not list(tmp_path.glob(".*.tmp")), "the next write of that checkpoint removes the leftover"


@pytest.mark.slow
def test_two_process_bf16_run_killed_mid_epoch_then_resumed_equals_the_uninterrupted_run(photos, tmp_path):
    # Two processes (gan_ddp over gloo), two images per rank and batch, bf16-mixed autocast: killed after batch
    # 8, resumed from batch 6.
    options = dict(devices=2, precision="bf16-mixed")
    reference = fit(tmp_path / "uninterrupted", photos, **options)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "killed"
    killed = fit(run, photos, callbacks=(kill_at(8),), **options)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert batches_of(last_checkpoint(run)) == 6
    assert_same_training_state(resume(run, photos, **options), last_checkpoint(tmp_path / "uninterrupted"))


# ---------------------------------------------------------------- the data's place


def training_data(folder: Path, workers: int = 0) -> ImageDataModule:
    data = ImageDataModule(source=str(folder), val_count=1, resolution=32, min_size=32, batch_size=3,
                           num_workers=workers, seed=5)
    data.setup("fit")
    return data


def training_loader(folder: Path, workers: int) -> ResumableLoader:
    return training_data(folder, workers).train_dataloader()


def test_a_loader_resumed_mid_epoch_yields_what_the_uninterrupted_one_would_whoever_reads(assets, tmp_path):
    folder = bsds_photos(assets, tmp_path, "train", 10)  # 9 to train on: epochs of 3 batches of 3
    uninterrupted = training_loader(folder, workers=0)
    epochs = []
    for epoch in range(2):
        uninterrupted.sampler.set_epoch(epoch)
        epochs.append([batch["image"] for batch in uninterrupted])
    assert len(epochs[1]) == 3 and not torch.equal(epochs[0][0], epochs[1][0])  # a new order and new crops

    interrupted = training_loader(folder, workers=0)
    interrupted.sampler.set_epoch(1)
    next(iter(interrupted))
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "served": 3, "world_size": 1}
    resumed = training_loader(folder, workers=2)  # two worker processes decode the rest
    resumed.load_state_dict(state)
    rest = [batch["image"] for batch in resumed]
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, epochs[1][1:], strict=True))

    # A place saved after an epoch's last batch is the start of the next epoch.
    resumed.load_state_dict({"epoch": 0, "served": 9, "world_size": 1})
    assert resumed.sampler.epoch == 1 and torch.equal(next(iter(resumed))["image"], epochs[1][0])


def test_ranks_read_disjoint_shares_of_one_order_per_epoch(assets, tmp_path):
    dataset = training_data(bsds_photos(assets, tmp_path, "train", 9)).train_dataset  # 8 to train on
    shares = [list(EpochSampler(dataset, seed=5, rank=rank, world_size=2)) for rank in (0, 1)]
    indices = [[sample.index for sample in share] for share in shares]
    assert sorted(indices[0] + indices[1]) == list(range(8))
    alone = list(EpochSampler(dataset, seed=5))
    assert [sample.index for sample in alone[:2]] == [indices[0][0], indices[1][0]]
    # An image's crop is the same whichever rank draws it, with any number of ranks.
    seeds = {sample.index: sample.seed for sample in alone}
    assert all(seeds[sample.index] == sample.seed for share in shares for sample in share)


# ---------------------------------------------------------------- broken checkpoints


def short_run(tmp_path: Path, folder: Path, batches: int, callbacks=(), plugins=(),
              **options) -> tuple[VAEGAN, L.Trainer]:
    L.seed_everything(0)
    data = ImageDataModule(source=str(folder), val_source=str(folder), resolution=32, batch_size=4,
                           num_workers=0, min_size=32)
    module = VAEGAN(arch="mini", perceptual_net="squeeze", disc_channels=16, disc_layers=2, lr=1e-3,
                    disc_start=2, ema_decay=0.9, max_batches=batches, **options)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=CSVLogger(tmp_path / "logs"),
                        callbacks=[checkpoints, *callbacks], limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
                        plugins=list(plugins))
    trainer.fit(module, data)
    return module, trainer


def test_a_truncated_checkpoint_is_refused_by_name(assets, tmp_path, capsys):
    folder = bsds_photos(assets, tmp_path, "train", 4)
    short_run(tmp_path, folder, batches=1)
    whole = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    truncated = tmp_path / "cut-short.ckpt"
    truncated.write_bytes(whole[: len(whole) * 2 // 3])
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"arch": "mini", "perceptual_net": "squeeze"},
        "data": {"source": str(folder), "val_source": str(folder), "resolution": 32, "min_size": 32,
                 "num_workers": 0},
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path)},
    }))
    for command in (["fit", "--config", str(config), "--ckpt_path", str(truncated)],
                    ["export", str(truncated), str(tmp_path / "vae")]):
        with pytest.raises(SystemExit) as exited:
            main(command)
        assert exited.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"vaegan {command[0]}: error: {truncated} is not a complete checkpoint"), error
        assert "cut short" in error and "Traceback" not in error


# ---------------------------------------------------------------- bad steps


class PoisonBatches(L.Callback):
    """Turn the images of the given batches into NaN, as a corrupt input or an overflow would make them."""

    def __init__(self, batches: range):
        self.batches = batches
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if int(module.batches_seen) in self.batches:
            batch.fill_(float("nan"))
        self.states[int(module.batches_seen)] = {k: v.clone() for k, v in module.state_dict().items()}


def test_a_non_finite_batch_is_skipped_logged_and_changes_nothing(assets, tmp_path):
    folder = bsds_photos(assets, tmp_path, "train", 8)
    poison = PoisonBatches(range(3, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, trainer = short_run(tmp_path, folder, batches=6, callbacks=[poison])
    assert int(module.batches_seen) == 6
    skipped = [str(w.message) for w in caught if "not finite" in str(w.message)]
    assert skipped == [
        "batch 3: the generator's loss or gradients are not finite; its update is skipped (1 in a row, 1 in this run)",
        "batch 3: the discriminator's loss or gradients are not finite; its update is skipped (1 in a row, 1 in "
        "this run)",
    ]
    assert module.bad_steps.tolist() == [1, 1] and module.bad_steps_in_a_row.tolist() == [0, 0]
    # Batch 3 changed no weight, EMA or optimizer state; the batches around it did.
    before, after = poison.states[3], poison.states[4]
    for key, value in before.items():
        if key not in ("batches_seen", "bad_steps", "bad_steps_in_a_row"):
            assert torch.equal(after[key], value), key
    assert not torch.equal(poison.states[5]["vae.decoder.conv_out.weight"], after["vae.decoder.conv_out.weight"])
    assert all(torch.isfinite(value).all() for value in module.state_dict().values())
    adam_steps = [int(state["step"]) for state in trainer.optimizers[0].state.values()]
    assert set(adam_steps) == {5}  # six batches, one skipped
    logged = (Path(trainer.log_dir) / "metrics.csv").read_text()
    assert "train/bad_steps" in logged


def test_in_fp16_a_skipped_step_backs_the_loss_scale_off(assets, tmp_path):
    # fp16 autocast with a loss scaler, on the CPU (Lightning's Trainer only offers it on GPUs by name).
    folder = bsds_photos(assets, tmp_path, "train", 8)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scales = {}

    class RecordScale(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            scales[int(module.batches_seen)] = (scaler.get_scale(), module.bad_steps.tolist())

    module, _ = short_run(tmp_path, folder, batches=4, callbacks=[PoisonBatches(range(2, 3)), RecordScale()],
                          plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    # Batch 2 (the third: batches count from 0) skipped both updates, and each skip halved the scale.
    assert scales[2] == (256.0, [0, 0]) and scales[3] == (64.0, [1, 1]) and scales[4] == (64.0, [1, 1])
    assert all(torch.isfinite(value).all() for value in module.state_dict().values())


def test_consecutive_bad_steps_stop_the_run_with_a_message_and_keep_the_checkpoint(assets, tmp_path):
    folder = bsds_photos(assets, tmp_path, "train", 8)  # epochs of two batches: a checkpoint after batch 2
    with pytest.raises(TrainingDiverged, match=r"batch 4: the generator's loss or gradients were not finite 3 "
                                               r"times in a row \(max_bad_steps=3\)"):
        short_run(tmp_path, folder, batches=20, callbacks=[PoisonBatches(range(2, 20))], max_bad_steps=3)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert batches_of(checkpoint) == 2
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())


def test_a_diverging_fit_ends_with_one_line_and_status_2(assets, tmp_path, capsys):
    # A learning rate of 1e30: the first update sends the weights far out, and from then on every loss is NaN.
    folder = bsds_photos(assets, tmp_path, "train", 4)
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"arch": "mini", "perceptual_net": "squeeze", "lr": 1.0e30, "lr_warmup": 0, "max_bad_steps": 2,
                  "max_batches": 10},
        "data": {"source": str(folder), "val_source": str(folder), "resolution": 32, "min_size": 32,
                 "num_workers": 0, "batch_size": 2},
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "limit_val_batches": 0,
                    "enable_checkpointing": False, "default_root_dir": str(tmp_path)},
    }))
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", str(config)])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("vaegan fit: error: batch ") and "not finite 2 times in a row" in error, error
