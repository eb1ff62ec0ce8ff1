"""What a diffusion probe measured, and the files it leaves behind (`vaegan probe`):

    summary.json    settings, the distance used, what compares and what does not, and per VAE: latent shape and
                    normalisation, the distance of its reconstructions, and per seed the validation curve, the
                    distance of the samples and the training time; the ranking per seed
    results.md      the table, one row per VAE, with the ranking and the caveats under it
    curves.png      validation loss over training (mean over the fixed timesteps), and the final loss per timestep
    samples/*.png   64 samples of each probe, decoded by its VAE (written while probing)
    report.html     all of it on one page (`vaegan.reporting.html`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.reporting.html import write_html_report
from vaegan.reporting.markdown import markdown_table
from vaegan.utils.files import write_json


@dataclass
class ProbeRun:
    """One VAE probed with one seed."""

    seed: int
    curve: list[dict[str, Any]]  # {"step", "loss", "loss_t0.1", ...} at each validation
    distance: float  # of the decoded samples to the real images
    samples_grid: str  # path relative to the output folder
    train_seconds: float  # wall time of the training this process did
    trained_steps: int  # optimizer steps this process did (fewer than `steps` after a resume)

    @property
    def final(self) -> dict[str, Any]:
        return self.curve[-1]


@dataclass
class ProbedModel:
    """One VAE: its latents and the probes trained on them."""

    label: str
    path: str
    scrambled: bool
    latent_shape: tuple[int, int, int]
    declared: LatentNormalization  # the VAE's own factors (what the shards store)
    probe_normalization: LatentNormalization  # applied on top of the declared one before training
    train_images: int
    val_images: int
    num_classes: int  # 0: unconditional
    parameters: int  # of the probe
    reconstruction_distance: float  # of the VAE's reconstructions of the real images
    runs: list[ProbeRun] = field(default_factory=list)

    def run(self, seed: int) -> ProbeRun:
        return next(run for run in self.runs if run.seed == seed)


@dataclass
class ProbeResult:
    """Everything a probe job measured."""

    settings: dict[str, Any]  # the job's options that the results depend on
    data: str  # the image set that was encoded
    num_images: int  # real images the distance compares with
    num_classes: int
    distance_name: str  # "FID", "FD-AlexNet", ...
    distance_description: str
    models: list[ProbedModel]
    seconds: float

    @property
    def seeds(self) -> list[int]:
        return list(self.settings["seeds"])

    def ranking(self, seed: int) -> list[str]:
        """The VAEs of one seed from best to worst by the distance of their samples."""
        distances = {model.label: model.run(seed).distance for model in self.models}
        return sorted(distances, key=lambda label: (distances[label], label))

    @property
    def consistent(self) -> bool:
        """Whether every seed ranks the VAEs in the same order."""
        return len({tuple(self.ranking(seed)) for seed in self.seeds}) == 1


def write_probe_report(result: ProbeResult, output: str | Path) -> dict[str, Path]:
    """Write summary.json, results.md, curves.png and report.html into `output`; returns their paths by kind."""
    output = Path(output)
    (output / "results.md").write_text(markdown_report(result))
    paths = {
        "summary": write_json(output / "summary.json", summary(result)),
        "markdown": output / "results.md",
        "curves": curves_plot(result, output / "curves.png"),
    }
    paths["html"] = write_html_report(output)
    return paths


def comparability_notes(result: ProbeResult) -> list[str]:
    """What the numbers of different VAEs may and may not be compared on: shown wherever the numbers are."""
    settings = result.settings
    normalised = (
        "zero mean and unit variance, measured on the training images' latents on top of each VAE's declared factors"
        if settings["normalization"] == "measured" else "each VAE's declared scaling and shift factors, as they are"
    )
    notes = [
        "Every probe has the same network, initialisation seed, steps, batch size and learning rate; only the "
        "latents differ.",
        f"Latents are normalised to {normalised}. The loss is the flow-matching velocity error averaged over latent "
        "elements (per dimension), at fixed timesteps on held-out images with fixed noise; a probe that predicts "
        "0 scores 2.0 on unit-variance latents.",
        "Losses compare directly between VAEs of one latent shape. Between shapes the per-dimension loss says how "
        "predictable each element is, not how good the samples are: a latent with more elements per image carries "
        "more of it at the same loss.",
        "A low loss alone is not a good latent space: the loss says how predictable the latents are, not whether "
        "the decoder makes images of them (an untrained VAE's latents can be easy to predict and still decode to "
        f"noise). The {result.distance_name} of the decoded samples ranks the VAEs; the same distance of the VAE's "
        "plain reconstructions is the floor those samples cannot beat.",
        f"{result.distance_name}: {result.distance_description}. {settings['samples']} samples per probe against "
        f"{result.num_images} real images; the distance is biased by these counts, so compare it only between "
        "runs with the same counts and image set.",
    ]
    if result.distance_name != "FID":
        notes.append(f"{result.distance_name} is not FID: no Inception weights were used, and its scale is its own.")
    if settings["scramble"]:
        notes.append(
            f"{', '.join(settings['scramble'])}: latents multiplied by a fixed random +-1 pattern (one sign per "
            "element, the same for every image) before training and again before decoding: the VAE's "
            "reconstructions, a latent space made deliberately harder to learn.")
    return notes


def summary(result: ProbeResult) -> dict[str, Any]:
    """Everything in the report, as data."""
    return {
        "protocol": {
            "data": result.data,
            "images": result.num_images,
            "classes": result.num_classes or "unconditional",
            "objective": "flow matching: x_t = (1 - t) x0 + t e, velocity e - x0, Euler sampling",
            **result.settings,
            "seconds": round(result.seconds, 1),
        },
        "distance": {"name": result.distance_name, "description": result.distance_description},
        "comparability": comparability_notes(result),
        "ranking": {
            "by": f"{result.distance_name} of decoded samples, lowest first",
            "per_seed": {str(seed): result.ranking(seed) for seed in result.seeds},
            "consistent": result.consistent,
        },
        "models": [model_summary(model) for model in result.models],
    }


def model_summary(model: ProbedModel) -> dict[str, Any]:
    return {
        "name": model.label,
        "path": model.path,
        "scrambled": model.scrambled,
        "latent": {
            "shape": list(model.latent_shape),
            "declared_normalization": model.declared.to_json(),
            "probe_normalization": model.probe_normalization.to_json(),
        },
        "images": {"train": model.train_images, "validation": model.val_images},
        "probe_parameters": model.parameters,
        "reconstruction_distance": model.reconstruction_distance,
        "final_loss": float(np.mean([run.final["loss"] for run in model.runs])),
        "sample_distance": float(np.mean([run.distance for run in model.runs])),
        "seeds": [
            {
                "seed": run.seed,
                "final_loss": run.final["loss"],
                "final_loss_by_timestep": {key: value for key, value in run.final.items() if key.startswith("loss_t")},
                "sample_distance": run.distance,
                "samples": run.samples_grid,
                "train_seconds": round(run.train_seconds, 1),
                "trained_steps": run.trained_steps,
                "curve": run.curve,
            }
            for run in model.runs
        ],
    }


def probe_table(result: ProbeResult) -> str:
    """One row per VAE: validation loss and sample distance per seed, reconstruction distance, rank per seed."""
    name, seeds = result.distance_name, result.seeds
    header = ["model", "latent", *(f"val loss ↓ seed {s}" for s in seeds),
              *(f"{name} samples ↓ seed {s}" for s in seeds), f"{name} reconstructions ↓",
              *(f"rank seed {s}" for s in seeds), "s/probe"]
    body = []
    for model in result.models:
        channels, height, width = model.latent_shape
        cells = [model.label, f"{channels}×{height}×{width}{', scrambled' if model.scrambled else ''}"]
        cells += [f"{model.run(seed).final['loss']:.4f}" for seed in seeds]
        cells += [f"{model.run(seed).distance:.2f}" for seed in seeds]
        cells.append(f"{model.reconstruction_distance:.2f}")
        cells += [str(result.ranking(seed).index(model.label) + 1) for seed in seeds]
        trained = [run for run in model.runs if run.trained_steps == result.settings["steps"]]
        cells.append(f"{np.mean([run.train_seconds for run in trained]):.0f}" if trained else "n/a (resumed)")
        body.append(cells)
    return markdown_table(header, body)


def timestep_table(result: ProbeResult) -> str:
    """The final validation loss at each fixed timestep, mean over seeds: where in the noise range VAEs differ."""
    keys = [key for key in result.models[0].runs[0].final if key.startswith("loss_t")]
    header = ["model", *(f"t = {key.removeprefix('loss_t')}" for key in keys)]
    body = []
    for model in result.models:
        values = [np.mean([run.final[key] for run in model.runs]) for key in keys]
        body.append([model.label, *(f"{value:.4f}" for value in values)])
    return markdown_table(header, body)


def markdown_report(result: ProbeResult) -> str:
    settings = result.settings
    order = {seed: " < ".join(result.ranking(seed)) for seed in result.seeds}
    verdict = "the same order for every seed" if result.consistent else "the seeds disagree: the gaps are within noise"
    protocol = (
        f"{result.num_images} images of `{result.data}` at {settings['resolution']}²"
        f"{f', {result.num_classes} classes' if result.num_classes else ', unconditional'}; a DiT of width "
        f"{settings['width']}, depth {settings['depth']}, {settings['heads']} heads, patch {settings['patch_size']} "
        f"({result.models[0].parameters:,} parameters), {settings['steps']} steps of batch {settings['batch_size']}, "
        f"AdamW lr {settings['lr']:g}, EMA {settings['ema_decay']:g}; {settings['samples']} samples with "
        f"{settings['sampling_steps']} Euler steps."
    )
    lines = [
        "# Diffusion probe", "", probe_table(result), "",
        f"Ranking by {result.distance_name} of the samples, best first: "
        + "; ".join(f"seed {seed}: {text}" for seed, text in order.items()) + f" ({verdict}).", "",
        "Final validation loss per timestep (mean over seeds):", "", timestep_table(result), "",
        f"- {protocol}",
        *(f"- {note}" for note in comparability_notes(result)), "",
    ]
    return "\n".join(lines)


def curves_plot(result: ProbeResult, path: Path) -> Path:
    """Validation loss over training (every model a colour, every seed a line style) and per timestep at the end."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(11, 4), layout="constrained")
    over_steps, per_timestep = figure.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    colours = [f"C{index % 10}" for index in range(len(result.models))]
    for model, colour in zip(result.models, colours, strict=True):
        for number, run in enumerate(model.runs):
            steps = [point["step"] for point in run.curve]
            over_steps.plot(steps, [point["loss"] for point in run.curve], styles[number % len(styles)],
                            color=colour, linewidth=1.2, label=f"{model.label} seed {run.seed}")
        keys = [key for key in model.runs[0].final if key.startswith("loss_t")]
        timesteps = [float(key.removeprefix("loss_t")) for key in keys]
        means = [np.mean([run.final[key] for run in model.runs]) for key in keys]
        per_timestep.plot(timesteps, means, "o-", color=colour, label=model.label)
    over_steps.set_xlabel("step")
    over_steps.set_ylabel("validation loss per dimension (mean over timesteps)")
    over_steps.grid(alpha=0.3)
    over_steps.legend(fontsize=7)
    per_timestep.set_xlabel("timestep t (0: data, 1: noise)")
    per_timestep.set_ylabel("final validation loss")
    per_timestep.grid(alpha=0.3)
    per_timestep.legend(fontsize=7)
    figure.suptitle(f"diffusion probe on {Path(result.data).name}: lower is easier to model", fontsize=10)
    figure.savefig(path, dpi=120)
    return path
