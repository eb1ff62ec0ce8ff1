"""`vaegan probe`: how learnable is each VAE's latent space? Train the same small diffusion transformer, with the
same seed and budget, on each VAE's latents of one image set, and compare what it learned.

For each VAE (and each seed):
1. encode the image set with `vaegan encode` (Parquet shards of the posterior, resumable);
2. normalise the latents to zero mean and unit variance as measured on the training images (or trust the VAE's
   declared factors), so every probe sees data of the same scale and the per-dimension losses compare;
3. train the DiT by flow matching (`vaegan.probe.module`), measuring its loss on held-out latents at fixed
   timesteps as it trains;
4. sample from it, decode the samples with the VAE, and measure their distance to the real images (FID when
   Inception weights are found, else a Fréchet distance on AlexNet features, named so); the same distance of
   the VAE's plain reconstructions is the floor the samples cannot beat.

Everything lands in `output` (see `vaegan.probe.report` for the report files):

    images/                  the image set when data is "demo" (crops of the photos bundled with scikit-image)
    latents/LABEL/           the encoded shards of each VAE
    runs/LABEL/seed-S/       last.ckpt (resumable), result.json when done
    runs/LABEL/reconstruction.json, runs/real-features.pt

Rerun the same command after an interruption (even kill -9): finished parts are kept, the encoding and the
training resume where they stopped, and the results equal those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from PIL import Image

from vaegan.autoencoder.codec import Codec
from vaegan.autoencoder.normalization import LatentNormalization, LatentStatistics
from vaegan.formats.load import load
from vaegan.formats.specs import ModelSpec, parse_model_specs
from vaegan.images.readers import DEMO_TRAIN_PHOTOS, DEMO_VAL_PHOTOS, EvalCrop, load_demo_photos, open_reader
from vaegan.images.reading import RESAMPLE, ImageError
from vaegan.latents.dataset import LatentDataset
from vaegan.latents.encode import encode
from vaegan.latents.job import EncodeJob
from vaegan.metrics.distribution import FeatureMoments, frechet_distance
from vaegan.pretrained.features import DistributionFeatures
from vaegan.probe.job import SELECTION, ProbeJob, job_settings
from vaegan.probe.module import CHECKPOINT_NAME, ProbeLatents, ProbeModule, checkpoint_step, fit
from vaegan.probe.report import ProbedModel, ProbeResult, ProbeRun, write_probe_report
from vaegan.reporting.grids import image_grid, save_grid
from vaegan.utils.files import (
    claim_json,
    differences,
    read_json,
    replace_folder_atomically,
    write_file_atomically,
    write_json,
)
from vaegan.utils.seeds import seeded_generator

SETTINGS_NAME = "probe.json"
# The scrambling pattern is part of the "worse VAE", not of a run: one fixed pattern for every seed.
SCRAMBLE_SEED = 12345
# Demo image set: every photo's shorter side resized to 2x and 4x the crop, cut into crops at half-crop strides,
# each also mirrored: about 1,300 crops of nine photos at 64^2.
DEMO_SCALES = (2, 4)
GRID_SAMPLES = 64


def probe(job: ProbeJob) -> ProbeResult:
    """Run a probe job (see `ProbeJob` for the options); returns what it measured and writes the report."""
    started = time.perf_counter()
    output = Path(job.output)
    specs = parse_model_specs(job.models)
    unknown = sorted(set(job.scramble) - {spec.label for spec in specs})
    if unknown:
        raise ValueError(f"scramble names {unknown}, which are not model labels ({[s.label for s in specs]})")
    claim_output(output, job)
    device = torch.device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = demo_images(output / "images", job.resolution) if job.data == "demo" else job.data
    features = DistributionFeatures.find(job.distance, job.inception_weights).to(device)
    real = real_moments(output / "runs" / "real-features.pt", images, job, features, device)

    models, num_classes = [], 0
    for spec in specs:
        latents = encode_latents(spec, images, output / "latents" / spec.label, job, device)
        model = probe_model(spec, latents, job, output, features, real, device)
        models.append(model)
        num_classes = model.num_classes
    result = ProbeResult(
        settings=job_settings(job), data=str(images), num_images=real.count, num_classes=num_classes,
        distance_name=features.name, distance_description=features.description, models=models,
        seconds=time.perf_counter() - started,
    )
    paths = write_probe_report(result, output)
    if job.progress:
        print((output / "results.md").read_text())
        print(f"wrote {', '.join(sorted(path.name for path in paths.values()))} to {output}")
    return result


def claim_output(output: Path, job: ProbeJob) -> None:
    """Record the job's settings, or check that a later run into the folder has the same ones (besides which VAEs
    and seeds it probes): probes trained differently must not be compared as if they were alike."""
    settings = {key: value for key, value in job_settings(job).items() if key not in SELECTION}
    changed = differences(claim_json(output / SETTINGS_NAME, settings), settings)
    if changed:
        raise ValueError(f"{output} holds a probe run with other settings ({changed}); "
                         "rerun with the original settings, or use a new output folder")


def claim_label(folder: Path, spec: ModelSpec, scrambled: bool) -> None:
    """A label's probes stay those of one VAE, scrambled or not (the encoding folder checks the weights)."""
    existing = claim_json(folder / "model.json", {"path": spec.path, "scrambled": scrambled})
    if existing.get("scrambled") != scrambled:
        raise ValueError(f"{spec.label} was probed {'with' if existing.get('scrambled') else 'without'} scrambling in "
                         f"{folder.parent.parent}; give this variant another label")


# ---- the image set ----


def demo_images(folder: Path, size: int) -> Path:
    """Crops of the photos bundled with scikit-image as PNG files, one subfolder per photo (its class); written
    once (into a temporary folder that is renamed into place), reused afterwards."""
    if folder.is_dir():
        return folder

    def write(target: Path) -> None:
        photos = load_demo_photos(DEMO_TRAIN_PHOTOS + DEMO_VAL_PHOTOS)
        for index in range(len(photos)):
            image = photos.read(index)
            name = photos.name(index).removeprefix("skimage.data.")
            (target / name).mkdir()
            for scale in DEMO_SCALES:
                shorter = scale * size
                ratio = shorter / min(image.size)
                resized = image.resize((round(image.width * ratio), round(image.height * ratio)), RESAMPLE)
                for top in range(0, resized.height - size + 1, size // 2):
                    for left in range(0, resized.width - size + 1, size // 2):
                        crop = resized.crop((left, top, left + size, top + size))
                        stem = f"{scale}x-{top:04d}-{left:04d}"
                        crop.save(target / name / f"{stem}.png")
                        crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target / name / f"{stem}-mirror.png")

    folder.parent.mkdir(parents=True, exist_ok=True)
    replace_folder_atomically(folder, write)
    return folder


@torch.inference_mode()
def real_moments(cache: Path, images: Path | str, job: ProbeJob, features: DistributionFeatures,
                 device: torch.device) -> FeatureMoments:
    """Feature statistics of the real images (centre crops at the resolution), computed once per output folder."""
    if cache.is_file():
        stored = torch.load(cache, weights_only=True)
        if stored["description"] == features.description:
            return FeatureMoments(stored["count"], stored["total"], stored["outer_total"])
    reader, _ = open_reader(str(images), job.split, job.image_column, min_size=0)
    crop = EvalCrop(job.resolution)
    moments, batch = FeatureMoments(), []
    for index in range(len(reader)):
        try:
            batch.append(crop(reader.read(index)))
        except ImageError:
            continue  # encoding lists it in its errors.jsonl
        if len(batch) == job.encode_batch_size:
            moments.update(features(torch.stack(batch).to(device)))
            batch = []
    if batch:
        moments.update(features(torch.stack(batch).to(device)))
    cache.parent.mkdir(parents=True, exist_ok=True)
    state = {"description": features.description, "count": moments.count, "total": moments.total,
             "outer_total": moments.outer_total}
    write_file_atomically(cache, lambda temporary: torch.save(state, temporary))
    return moments


# ---- latents ----


def encode_latents(spec: ModelSpec, images: Path | str, folder: Path, job: ProbeJob,
                   device: torch.device) -> LatentDataset:
    """The VAE's posterior of every image, through `vaegan encode` (resumes a killed encoding)."""
    encode(EncodeJob(
        model=spec.path, input=str(images), output=str(folder), crop=job.resolution, store="posterior",
        latent_dtype="fp32", device=str(device), batch_size=job.encode_batch_size, num_workers=job.num_workers,
        split=job.split, image_column=job.image_column, preset=job.preset, progress=False,
    ))
    return LatentDataset(folder)  # read in order, a row group at a time: nothing is decoded twice


def class_names(dataset: LatentDataset) -> list[str]:
    """Each image's class: the first folder of its id (a path relative to the image folder), "" when none."""
    return [image_id.split("/")[0] if "/" in image_id else "" for image_id in dataset.ids]


def split_indices(count: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """(train, validation): every n-th image is held out, n = round(1 / val_fraction), at least one; the same on
    every run."""
    if count < 2:
        raise ValueError(f"a probe needs at least 2 images (one to hold out), got {count}")
    every = max(2, round(1 / val_fraction))
    validation = list(range(every - 1, count, every)) or [count - 1]
    held_out = set(validation)
    return [i for i in range(count) if i not in held_out], validation


def sign_pattern(shape: tuple[int, int, int]) -> torch.Tensor:
    """A fixed random +-1 per latent element (C, h, w), the same for every image and run: multiplying by it is its
    own inverse, keeps every value's magnitude, and breaks the spatial structure a diffusion model relies on."""
    generator = torch.Generator().manual_seed(SCRAMBLE_SEED)
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def probe_latents(dataset: LatentDataset, job: ProbeJob, scrambled: bool,
                  ) -> tuple[ProbeLatents, LatentNormalization, torch.Tensor | None]:
    """All latents in the space the probe trains on, the normalisation applied on top of the VAE's declared one
    (measured on the training split unless told otherwise), and the scrambling pattern (or None)."""
    stored = [dataset.stored(index) for index in range(len(dataset.ids))]
    mean = torch.stack([item["mean"] for item in stored])  # (N, C, h, w), the VAE's declared normalisation
    logvar = torch.stack([item["logvar"] for item in stored]) if job.posterior == "sample" else None
    names = class_names(dataset)
    classes = sorted(set(names))
    if job.class_conditional and len(classes) < 2:
        raise ValueError(f"class_conditional needs images in at least two class subfolders; {dataset.path} has "
                         f"{len(classes)}")
    labels = torch.tensor([classes.index(name) for name in names]) if job.class_conditional else \
        torch.zeros(len(names), dtype=torch.long)
    normalization = LatentNormalization()
    if job.normalization == "measured":
        train, _ = split_indices(len(names), job.val_fraction)
        drawn = mean[train]
        if logvar is not None:  # measure what the probe trains on: posterior samples
            noise = torch.randn(drawn.shape, generator=seeded_generator(0, 0, "normalization"))
            drawn = drawn + logvar[train].mul(0.5).exp() * noise
        statistics = LatentStatistics()
        statistics.update(drawn)
        normalization = LatentNormalization.fit(statistics, "scalar", "shift")
    mean = normalization.normalize(mean)
    std = None if logvar is None else normalization.normalize_logvar(logvar).mul(0.5).exp()
    pattern = sign_pattern(tuple(mean.shape[1:])) if scrambled else None
    if pattern is not None:
        mean = mean * pattern
    return ProbeLatents(mean, std, labels, list(dataset.ids)), normalization, pattern


# ---- one VAE ----


def probe_model(spec: ModelSpec, dataset: LatentDataset, job: ProbeJob, output: Path,
                features: DistributionFeatures, real: FeatureMoments, device: torch.device) -> ProbedModel:
    """Train and measure one probe per seed on this VAE's latents (finished probes are read back, not redone)."""
    scrambled = spec.label in job.scramble
    latents, normalization, pattern = probe_latents(dataset, job, scrambled)
    train_indices, val_indices = split_indices(len(latents), job.val_fraction)
    train, validation = latents.subset(train_indices), latents.subset(val_indices)
    vae = load(spec.path, config=job.preset)
    codec = Codec(vae, device=device, batch_size=job.encode_batch_size)

    def decode(probe_space: torch.Tensor) -> torch.Tensor:
        """Latents as the probe sees them (B, C, h, w) -> images (B, 3, R, R) in [-1, 1]."""
        unscrambled = probe_space * pattern if pattern is not None else probe_space
        return codec.decode(normalization.denormalize(unscrambled).to(device))

    folder = output / "runs" / spec.label
    claim_label(folder, spec, scrambled)
    reconstruction = reconstruction_distance(folder / "reconstruction.json", latents, decode, features, real, job)
    num_classes = int(latents.labels.max()) + 1 if job.class_conditional else 0
    model = ProbedModel(
        label=spec.label, path=spec.path, scrambled=scrambled, latent_shape=tuple(latents.mean.shape[1:]),
        declared=dataset.normalization, probe_normalization=normalization, train_images=len(train),
        val_images=len(validation), num_classes=num_classes, parameters=0, reconstruction_distance=reconstruction,
    )
    for seed in job.seeds:
        run, parameters = probe_seed(seed, folder / f"seed-{seed}", train, validation, num_classes, decode, job,
                                     output, spec.label, features, real, device)
        model.runs.append(run)
        model.parameters = parameters
        if job.progress:
            print(f"probe {spec.label} seed {seed}: validation loss {run.final['loss']:.4f}, {features.name} of "
                  f"samples {run.distance:.2f} (of reconstructions {reconstruction:.2f})")
    return model


@torch.inference_mode()
def reconstruction_distance(cache: Path, latents: ProbeLatents, decode, features: DistributionFeatures,
                            real: FeatureMoments, job: ProbeJob) -> float:
    """The distance of the VAE's reconstructions (decoded posterior means) to the real images: what the probe's
    samples would score if it had learned the latent distribution exactly. As many reconstructions as samples,
    evenly spaced over the set, so that both distances carry the same small-sample bias."""
    if cache.is_file():
        return read_json(cache)["distance"]
    count = min(job.samples, len(latents))
    chosen = torch.linspace(0, len(latents) - 1, count).round().long()
    moments = FeatureMoments()
    for start in range(0, count, job.encode_batch_size):
        moments.update(features(decode(latents.mean[chosen[start:start + job.encode_batch_size]])))
    distance = frechet_distance(*real.mean_and_covariance(), *moments.mean_and_covariance())
    write_json(cache, {"distance": distance, "images": moments.count})
    return distance


def probe_seed(seed: int, folder: Path, train: ProbeLatents, validation: ProbeLatents, num_classes: int, decode,
               job: ProbeJob, output: Path, label: str, features: DistributionFeatures, real: FeatureMoments,
               device: torch.device) -> tuple[ProbeRun, int]:
    """Train (or resume) one probe, sample from it, measure; result.json makes a finished probe final."""
    grid = Path("samples") / f"{label}-seed{seed}.png"
    done = folder / "result.json"
    if done.is_file():
        stored = read_json(done)
        return ProbeRun(**stored["run"]), stored["parameters"]
    module = ProbeModule(
        latent_shape=tuple(train.mean.shape[1:]), num_classes=num_classes, patch_size=job.patch_size,
        width=job.width, depth=job.depth, heads=job.heads, mlp_ratio=job.mlp_ratio, lr=job.lr,
        lr_warmup=job.lr_warmup, weight_decay=job.weight_decay, ema_decay=job.ema_decay, seed=seed,
        steps=job.steps, val_every=job.val_every, val_timesteps=job.val_timesteps,
        checkpoint_every=job.checkpoint_every, checkpoint_path=str(folder / CHECKPOINT_NAME),
    )
    module.set_validation(validation)
    resumed_at = checkpoint_step(folder / CHECKPOINT_NAME)
    tick = time.perf_counter()
    module = fit(module, train, job.batch_size, job.label_dropout if num_classes else 0.0,
                 accelerator=device.type, precision=job.precision, grad_clip=job.grad_clip, progress=job.progress)
    train_seconds = time.perf_counter() - tick

    module.to(device).eval()
    labels = None
    if num_classes:  # classes in the proportions of the training images
        picks = torch.randint(len(train), (job.samples,), generator=seeded_generator(seed, 0, "sample-labels"))
        labels = train.labels[picks]
    moments, shown = FeatureMoments(), []
    latents = module.sample(job.samples, labels, job.sampling_steps, job.cfg_scale, seed)
    with torch.inference_mode():
        for start in range(0, job.samples, job.encode_batch_size):
            images = decode(latents[start:start + job.encode_batch_size])
            moments.update(features(images))
            if len(shown) * job.encode_batch_size < GRID_SAMPLES:
                shown.append(images.cpu())
    save_grid(image_grid(torch.cat(shown)[:GRID_SAMPLES]), output / grid)
    run = ProbeRun(
        seed=seed, curve=module.curve, samples_grid=grid.as_posix(),
        distance=frechet_distance(*real.mean_and_covariance(), *moments.mean_and_covariance()),
        train_seconds=train_seconds, trained_steps=job.steps - resumed_at,
    )
    parameters = module.model.num_parameters()
    write_json(done, {"run": dataclasses.asdict(run), "parameters": parameters})
    return run, parameters

