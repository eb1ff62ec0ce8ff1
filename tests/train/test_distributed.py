"""Two-process data-parallel training on CPU (gloo) with the `gan_ddp` strategy, launched as users launch it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import bsds_photos

# Run by Lightning's launcher once per rank: the script is re-executed with LOCAL_RANK set.
SCRIPT = """
import hashlib, json, os, sys
import lightning as L
import torch
from vaegan.train.data import ImageDataModule
from vaegan.train.module import VAEGAN

folder, out, strategy = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))  # different initial weights per rank on purpose


class Digest(L.Callback):
    def on_train_start(self, trainer, module):
        self.initial = module.vae.decoder.conv_out.weight.detach().clone()

    def on_train_end(self, trainer, module):
        state = {k: v for k, v in module.state_dict().items() if not k.startswith("perceptual.")}
        digest = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in state.values())).hexdigest()
        moved = (module.vae.decoder.conv_out.weight - self.initial).abs().max().item()
        record = dict(digest=digest, moved=moved, batches=int(module.batches_seen),
                      epoch_batches=trainer.num_training_batches)
        with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as file:
            json.dump(record, file)


module = VAEGAN(arch="mini", perceptual_net="squeeze", disc_channels=16, disc_layers=2, lr=1e-3,
                disc_start=2, max_batches=5, ema_decay=0.9)
data = ImageDataModule(source=folder, val_source=folder, resolution=32, min_size=32, batch_size=2, num_workers=0)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=-1, max_steps=-1,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, val_check_interval=2, default_root_dir=out,
                    callbacks=[Digest()])
trainer.fit(module, data)
"""


def run_two_processes(tmp_path: Path, folder: Path, strategy: str) -> subprocess.CompletedProcess:
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path), strategy],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_two_processes_train_the_same_model_on_different_images(assets, tmp_path):
    folder = bsds_photos(assets, tmp_path, "train", 8)
    result = run_two_processes(tmp_path, folder, "gan_ddp")
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # Both ranks ran 5 batches, including discriminator steps, each on half of the 8 images (2 batches of 2)...
    assert [r["batches"] for r in ranks] == [5, 5] and [r["epoch_batches"] for r in ranks] == [2, 2]
    # ...and end with identical weights (broadcast at start, gradients averaged), which really moved.
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["moved"] > 0
    # Validation ran on both ranks (metrics and latent statistics are collectives) and rank 0 drew the grids.
    assert {"batch_0000002.png", "batch_0000004.png"} <= {p.name for p in (tmp_path / "grids").glob("*.png")}


@pytest.mark.slow
def test_plain_ddp_is_refused_with_the_strategy_to_use(assets, tmp_path):
    folder = bsds_photos(assets, tmp_path, "train", 4)
    result = run_two_processes(tmp_path, folder, "ddp")
    assert result.returncode != 0
    assert "needs --trainer.strategy=gan_ddp" in result.stderr
