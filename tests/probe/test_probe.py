"""The diffusion probe: its DiT and flow matching against known values, its seeded batches, a short real training
run on real latents, the scrambled latent space, and resuming after kill -9 to the uninterrupted result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import vaegan
from vaegan.metrics.distribution import FeatureMoments, frechet_distance
from vaegan.pretrained.features import DistributionFeatures
from vaegan.probe.dit import DiT, sincos_position_embedding
from vaegan.probe.flow import euler_sample, flow_matching_loss, guided, interpolate, velocity
from vaegan.probe.job import ProbeJob
from vaegan.probe.module import ProbeLatents, StepBatches
from vaegan.probe.run import probe, sign_pattern, split_indices
from vaegan.utils.seeds import seeded_generator

from conftest import skimage_photos

ROOT = Path(__file__).resolve().parents[2]
# A probe small enough for a test: 24 photos at 32^2 (f4: 4x8x8 latents), a one-block DiT.
SMALL = dict(resolution=32, width=32, depth=1, heads=2, batch_size=8, lr=1e-3, lr_warmup=5, val_every=10,
             checkpoint_every=10, samples=24, sampling_steps=4, distance="alex", progress=False)


def test_dit_starts_as_zero_velocity_and_keeps_shapes():
    model = DiT(channels=4, patch_size=2, width=32, depth=2, heads=2, num_classes=3)
    x, t = torch.randn(5, 4, 8, 12), torch.rand(5)
    out = model(x, t, torch.tensor([0, 1, 2, 3, 0]))  # 3: "no class"
    assert out.shape == x.shape
    assert out.abs().max() == 0, "adaLN-Zero and the zeroed output layer: every block starts as the identity"
    with pytest.raises(ValueError, match="needs labels"):
        model(x, t)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 4, 7, 8), t[:1], torch.tensor([0]))


def test_position_embedding_is_the_2d_sincos_table():
    table = sincos_position_embedding(8, 3, 4)  # (12, 8)
    row, col = 2, 3
    frequencies = 1.0 / 10_000 ** (np.arange(2) / 2)
    expected = np.concatenate([np.sin(row * frequencies), np.cos(row * frequencies),
                               np.sin(col * frequencies), np.cos(col * frequencies)])
    np.testing.assert_allclose(table[row * 4 + col].numpy(), expected, atol=1e-6)


def test_flow_matching_path_target_and_euler_sampler():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.ones(3)), noise)
    assert torch.equal(flow_matching_loss(velocity(x0, noise), x0, noise), torch.zeros(3))
    assert flow_matching_loss(torch.zeros_like(x0), x0, noise).mean().item() == pytest.approx(
        (noise - x0).pow(2).mean().item(), rel=1e-6)

    # For data that is one point, the exact velocity at x_t is (x_t - point) / t; Euler on a straight path is exact.
    point = torch.randn(1, 2, 4, 4)
    exact = lambda x, t: (x - point) / t.view(-1, 1, 1, 1)  # noqa: E731
    torch.testing.assert_close(euler_sample(exact, torch.randn(6, 2, 4, 4), steps=3), point.expand(6, -1, -1, -1))


def test_classifier_free_guidance_combines_the_two_velocities():
    calls = []

    def model(x, t, labels):
        calls.append(labels)
        return torch.where(labels.view(-1, 1) == 9, torch.ones_like(x), 3 * torch.ones_like(x))

    field = guided(model, torch.tensor([1, 2]), null_label=9, scale=4.0)
    out = field(torch.zeros(2, 5), torch.rand(2))
    torch.testing.assert_close(out, torch.full((2, 5), 1 + 4 * (3 - 1.0)))  # v_null + s (v_label - v_null)
    assert len(calls) == 1, "conditional and unconditional run as one batch"


def test_batches_depend_on_the_step_alone():
    latents = ProbeLatents(torch.randn(20, 4, 8, 8), torch.rand(20, 4, 8, 8), torch.arange(20) % 3,
                           [str(i) for i in range(20)])
    from_start = list(StepBatches(latents, 6, seed=7, start=0, stop=5, label_dropout=0.5, null_label=3))
    resumed = list(StepBatches(latents, 6, seed=7, start=3, stop=5, label_dropout=0.5, null_label=3))
    for expected, actual in zip(from_start[3:], resumed, strict=True):
        for key in expected:
            assert torch.equal(expected[key], actual[key]), key
    other_seed = StepBatches(latents, 6, seed=8, start=0, stop=1).batch(0)
    assert not torch.equal(other_seed["noise"], from_start[0]["noise"])
    assert seeded_generator(0, 1, "noise").initial_seed() != seeded_generator(0, 1, "time").initial_seed()


def test_scrambling_is_a_fixed_sign_pattern_and_its_own_inverse():
    pattern = sign_pattern((4, 8, 8))
    assert torch.equal(pattern, sign_pattern((4, 8, 8)))
    assert set(pattern.unique().tolist()) == {-1.0, 1.0}
    assert 0.35 < (pattern > 0).float().mean() < 0.65
    assert torch.equal(pattern * pattern, torch.ones(4, 8, 8))
    train, validation = split_indices(25, 0.1)
    assert validation == [9, 19] and len(train) == 23 and not set(train) & set(validation)


def test_backbone_distance_is_named_and_measures_a_difference(assets):
    import skimage.data

    features = DistributionFeatures.find("auto")
    assert features.name == "FD-AlexNet" and "not FID" in features.description  # no Inception weights offline
    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    crops = torch.stack([photo[:, y:y + 64, x:x + 64] for y in range(0, 448, 40) for x in range(0, 448, 40)])
    generator = torch.Generator().manual_seed(0)
    noisy = (crops + 0.5 * torch.randn(crops.shape, generator=generator)).clamp(-1, 1)
    moments = {}
    with torch.no_grad():
        for name, images in (("a", crops[::2]), ("b", crops[1::2]), ("noisy", noisy[1::2])):
            moments[name] = FeatureMoments()
            moments[name].update(features(images))
    same = frechet_distance(*moments["a"].mean_and_covariance(), *moments["b"].mean_and_covariance())
    different = frechet_distance(*moments["a"].mean_and_covariance(), *moments["noisy"].mean_and_covariance())
    assert 0 < same < different / 3


@pytest.fixture
def vaes(tmp_path):
    torch.manual_seed(0)
    vaegan.save(vaegan.AutoencoderKL(vaegan.preset("mini")), tmp_path / "vae")
    return tmp_path / "vae"


@pytest.mark.slow
def test_probe_trains_ranks_and_reports(assets, tmp_path, vaes):
    # The untrained VAE's posterior is mostly noise; its means are a random projection of the photos, which has
    # structure to learn.
    data = skimage_photos(tmp_path / "photos", 24)
    job = dict(models=[f"plain={vaes}", f"scrambled={vaes}"], scramble=["scrambled"], data=str(data), steps=30,
               seeds=[0, 1], class_conditional=True, posterior="mean", **SMALL)
    result = probe(ProbeJob(output=str(tmp_path / "out"), **job))
    plain, scrambled = result.models
    assert plain.latent_shape == (4, 8, 8) and plain.num_classes == 2  # part0/, part1/
    assert scrambled.scrambled and not plain.scrambled
    # The pattern is undone before decoding: the same VAE reconstructs the same images.
    assert scrambled.reconstruction_distance == pytest.approx(plain.reconstruction_distance, rel=1e-6)
    for model in result.models:
        for run in model.runs:
            steps = [point["step"] for point in run.curve]
            assert steps == [0, 10, 20, 30]
            assert run.final["loss"] < run.curve[0]["loss"], "30 steps of training lower the validation loss"
            assert set(run.final) == {"step", "loss", "loss_t0.1", "loss_t0.3", "loss_t0.5", "loss_t0.7", "loss_t0.9"}
    # Normalised: the probe sees unit-variance latents whatever the VAE declares.
    assert plain.probe_normalization.scaling_factor != 1.0

    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert [model["name"] for model in summary["models"]] == ["plain", "scrambled"]
    assert summary["distance"]["name"] == "FD-AlexNet"
    assert set(summary["ranking"]["per_seed"]) == {"0", "1"}
    assert any("not comparable" in note or "compare" in note for note in summary["comparability"])
    markdown = (out / "results.md").read_text()
    assert "FD-AlexNet samples" in markdown and "FID" not in markdown.replace("not FID", "")
    for path in ("curves.png", "samples/plain-seed0.png", "samples/scrambled-seed1.png", "report.html"):
        assert (out / path).is_file(), path

    # A rerun reads the finished probes back instead of training again; other settings are refused.
    again = probe(ProbeJob(output=str(out), **job))
    assert again.models[0].runs[0].distance == plain.runs[0].distance
    with pytest.raises(ValueError, match="other settings.*steps"):
        probe(ProbeJob(**{**job, "steps": 40}, output=str(out)))
    with pytest.raises(ValueError, match="plain was probed without scrambling"):
        probe(ProbeJob(**{**job, "scramble": ["plain"]}, output=str(out)))


def _probe_command(vaes: Path, data: Path, output: Path) -> list[str]:
    # Long enough that the kill lands mid-run on any machine (a step of this DiT takes milliseconds).
    options = {**SMALL, "steps": 600, "checkpoint_every": 20, "val_every": 100}
    flags = [item for key, value in options.items() for item in (f"--{key}", str(value).lower()
             if isinstance(value, bool) else str(value))]
    return [sys.executable, "-m", "vaegan.cli", "probe", "--models+", f"untrained={vaes}", "--data", str(data),
            "--output", str(output), *flags]


@pytest.mark.slow
def test_probe_resumes_after_kill_9_to_the_uninterrupted_result(assets, tmp_path, vaes):
    data = skimage_photos(tmp_path / "photos", 24)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(_probe_command(vaes, data, tmp_path / "whole"), env=env, check=True, cwd=ROOT)

    checkpoint = tmp_path / "killed" / "runs" / "untrained" / "seed-0" / "last.ckpt"
    process = subprocess.Popen(_probe_command(vaes, data, tmp_path / "killed"), env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # let it train on past the checkpoint, so that the resumed run must repeat steps
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed: make it longer"
    killed_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_at < 600
    assert not (checkpoint.parent / "result.json").exists()

    subprocess.run(_probe_command(vaes, data, tmp_path / "killed"), env=env, check=True, cwd=ROOT)
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())["models"][0]["seeds"][0]
    resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())["models"][0]["seeds"][0]
    assert resumed["trained_steps"] == 600 - killed_at
    assert resumed["curve"] == whole["curve"]
    assert resumed["sample_distance"] == whole["sample_distance"]
    final = {name: torch.load(folder / "runs" / "untrained" / "seed-0" / "last.ckpt", map_location="cpu",
                              weights_only=False)["state_dict"] for name, folder in
             (("whole", tmp_path / "whole"), ("killed", tmp_path / "killed"))}
    for key, value in final["whole"].items():
        assert torch.equal(final["killed"][key], value), key
