"""The reconstruction benchmark: several VAEs, one image set, the protocol of the papers.

Protocol (what the latent-diffusion and VAE papers report, e.g. on ImageNet val or COCO at 256):
- every image has its shorter side resized to `resolution` (antialiased bicubic) and is centre-cropped square;
- each VAE encodes it to the posterior mean through the frozen `Codec` and decodes it back;
- the reconstruction is rounded to uint8, as a PNG would hold it, and every metric is computed on that
  uint8 image against the uint8 original: PSNR per image then averaged, SSIM (11-tap Gaussian), MS-SSIM
  (five scales, where the size allows), LPIPS per backbone, and rFID over the whole set.

The loop goes batch by batch and, within a batch, model by model, so the images are read and cropped once and
every model sees the same tensors; each model decodes each image once and all metrics come from that decode.
The images that the comparison sheets show are kept while the loop runs (a fixed, evenly spaced set and the
worst by the first model's PSNR), so nothing is decoded twice and memory does not grow with the data set.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vaegan.codec import Codec, resolve_dtype
from vaegan.formats import load
from vaegan.images import ImageError
from vaegan.inception import InceptionFeatures, MissingInceptionWeights
from vaegan.metrics import (
    MS_SSIM_MIN_SIZE,
    FeatureMoments,
    LatentStatistics,
    frechet_distance,
    latent_bits_per_pixel,
    ms_ssim,
    psnr,
    ssim,
    to_uint8,
)
from vaegan.perceptual import PerceptualLoss
from vaegan.readers import BUILDER_PREFIXES, EvalCrop, ImageReader, Skip, open_reader

# rFID from fewer images than feature dimensions (2048) has a rank-deficient covariance and a large positive
# bias; the number is still reported (papers use 50,000 ImageNet images), with this warning beside it.
RFID_RELIABLE_IMAGES = 2048


@dataclass
class ModelSpec:
    """A VAE to evaluate: the label used in every table and sheet, and where it is loaded from."""

    label: str
    path: str

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """`PATH` (label: the folder or file name) or `LABEL=PATH` (unless `spec` is an existing path)."""
        label, sep, path = spec.partition("=")
        if sep and label and "/" not in label and not Path(spec).exists():
            return cls(label, path)
        stripped = spec.rstrip("/")
        return cls(Path(stripped).stem if Path(stripped).is_file() else Path(stripped).name, spec)


@dataclass
class ModelResult:
    """Everything measured for one model besides the per-image rows."""

    label: str
    path: str
    parameters: int
    latent_shape: tuple[int, int, int]  # (C, h, w) at the evaluation resolution
    bits_per_pixel: float
    scaling_factor: float
    shift_factor: float
    statistics: LatentStatistics = field(default_factory=LatentStatistics)  # of the raw latents z
    codec_seconds: float = 0.0  # encode + decode, summed over batches
    rfid: float | None = None


@dataclass
class SheetImage:
    """One image kept for the comparison sheets: the original and every model's reconstruction, uint8."""

    index: int
    name: str
    selected: str  # why it is shown: "evenly spaced" or "worst PSNR"
    original: torch.Tensor  # (3, R, R) uint8
    reconstructions: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> (3, R, R) uint8
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> {"psnr": ..., ...}


@dataclass
class EvaluationResult:
    """What `evaluate` measured; `vaegan.report` turns it into files."""

    data: str
    resolution: int
    device: str
    dtype: str
    models: list[ModelResult]
    rows: list[dict[str, Any]]  # one per (model, image): {"model", "image", "psnr", "ssim", "ms_ssim", ...}
    lpips: dict[str, str]  # net -> where its backbone came from
    ms_ssim_note: str | None  # why MS-SSIM is n/a, or None
    rfid_network: str | None  # which Inception, or None when rFID was skipped
    rfid_note: str | None  # why rFID is missing, or a caveat about it
    skipped: list[Skip]
    sheets: list[SheetImage]
    seconds: float

    @property
    def num_images(self) -> int:
        return len({row["image"] for row in self.rows})

    @property
    def metric_columns(self) -> list[str]:
        return ["psnr", "ssim", "ms_ssim", *(f"lpips_{net}" for net in self.lpips)]


class EvalImages(Dataset):
    """Item i: `{"index", "name", "image": (3, R, R) in [-1, 1]}`, or `{"index", "name", "error"}`.

    Unlike training, a bad image is reported and left out, never replaced by its neighbour: a benchmark must
    not count an image twice.
    """

    def __init__(self, reader: ImageReader, resolution: int, root: str, limit: int | None = None):
        self.reader, self.crop, self.root = reader, EvalCrop(resolution), root
        self.length = len(reader) if limit is None else min(limit, len(reader))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = image_id(self.reader.name(index), self.root)
        try:
            return {"index": index, "name": name, "image": self.crop(self.reader.read(index))}
        except ImageError as error:
            return {"index": index, "name": name, "error": str(error)}


def image_id(name: str, source: str) -> str:
    """A file's path relative to the data folder (shorter, and the same on every machine); rows stay as named."""
    prefix, _, rest = source.partition(":")
    root = rest if prefix in BUILDER_PREFIXES and rest else source
    if os.path.isdir(root) and os.path.isabs(name) == os.path.isabs(root):
        relative = os.path.relpath(name, root)
        if not relative.startswith(".."):
            return relative
    return name


def collate_named(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [item for item in items if "image" in item]
    return {
        "image": torch.stack([item["image"] for item in good]) if good else None,  # (B, 3, R, R)
        "index": [item["index"] for item in good],
        "name": [item["name"] for item in good],
        "skipped": [(item["name"], item["error"]) for item in items if "error" in item],
    }


def fixed_sheet_indices(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over `total` images, first and last included: the same on every run."""
    count = min(count, total)
    if count <= 0:
        return []
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def load_metric_networks(
    lpips: tuple[str, ...], rfid: bool, inception_weights: str | None, inception_variant: str, device: torch.device
) -> tuple[dict[str, PerceptualLoss], InceptionFeatures | None, str | None]:
    """The LPIPS networks and the Inception network, before any image is read, so a missing file fails fast.

    A requested LPIPS backbone without weights is an error (PerceptualLoss names the file). rFID is skipped
    with a note when no Inception weights are found and no file was named; a named file must exist.
    """
    networks = {net: PerceptualLoss(net).to(device) for net in lpips}
    if not rfid:
        return networks, None, "rFID not computed (--no-rfid)"
    try:
        return networks, InceptionFeatures(inception_weights, inception_variant).to(device), None
    except MissingInceptionWeights as error:
        if inception_weights is not None:
            raise
        return networks, None, f"rFID skipped, no Inception weights: {error}"


@dataclass
class Measured:
    """One model on one batch: per-image metrics and what the rest of the run needs from the decode."""

    values: dict[str, list[float | None]]  # metric column -> one value per image
    latents: torch.Tensor  # (B, C, h, w) normalised, as Codec.encode returns them
    reconstructions: torch.Tensor  # (B, 3, R, R) uint8
    quantised: torch.Tensor  # (B, 3, R, R) the uint8 reconstructions in [-1, 1]
    seconds: float  # encode + decode


def reconstruct_and_measure(
    codec: Codec, images: torch.Tensor, lpips_networks: dict[str, PerceptualLoss], with_ms_ssim: bool
) -> Measured:
    """Encode to the posterior mean, decode once, round to uint8, and measure that against the original."""
    tick = time.perf_counter()
    latents = codec.encode(images)  # (B, C, h, w)
    decoded = codec.decode(latents)  # (B, 3, R, R) in [-1, 1]
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    seconds = time.perf_counter() - tick
    originals, reconstructions = to_uint8(images), to_uint8(decoded)
    quantised = reconstructions.float() / 127.5 - 1.0  # what the PNG shows
    values = {"psnr": psnr(originals, reconstructions), "ssim": ssim(originals, reconstructions)}
    values["ms_ssim"] = ms_ssim(originals, reconstructions) if with_ms_ssim else [None] * len(images)
    for net, network in lpips_networks.items():
        values[f"lpips_{net}"] = network(images, quantised)
    values = {key: value if isinstance(value, list) else value.tolist() for key, value in values.items()}
    return Measured(values, latents, reconstructions, quantised, seconds)


def evaluate(
    models: list[str],
    data: str,
    resolution: int = 256,
    device: str | None = None,
    dtype: str = "fp32",
    batch_size: int = 8,
    max_images: int | None = None,
    lpips: tuple[str, ...] = ("alex",),
    rfid: bool = True,
    inception_weights: str | None = None,
    inception_variant: str = "auto",
    sheets: int = 6,
    split: str = "train",
    image_column: str = "image",
    num_workers: int = 2,
    config: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Reconstruct every image of `data` with every model and measure it (see the module doc).

    Args:
        models: VAEs in any format `vaegan.load` reads, as `PATH` or `LABEL=PATH`; the first is the reference
            for choosing the worst images of the sheets.
        data: an image folder or a `datasets` source (as the data module reads it).
        resolution: side of the square crop; 256 is the usual benchmark size.
        device: where the VAEs and metric networks run; default CUDA when available.
        dtype: the VAEs' precision ("fp32", "bf16", "fp16"); metric networks always run in fp32. It is also
            the precision in which the latent's bits per pixel are counted.
        batch_size: images per forward pass.
        max_images: evaluate the first N images (in the source's sorted order) only.
        lpips: LPIPS backbones ("alex" is the usual evaluation metric, "vgg" what the SD recipe trains with).
        rfid: compute rFID when Inception weights are found.
        inception_weights, inception_variant: see `vaegan.inception`.
        sheets: how many images get a comparison sheet: half evenly spaced, half the worst by PSNR.
        split, image_column: for `datasets` sources.
        num_workers: DataLoader processes decoding and cropping images.
        config: preset name for model files that carry no config (as `vaegan.load`).
        progress: show a progress bar with images/s.
    """
    if not models:
        raise ValueError("give at least one model to evaluate")
    specs = [ModelSpec.parse(spec) for spec in models]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be distinct, got {labels}: name them with LABEL=PATH")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype)
    started = time.perf_counter()

    lpips_networks, inception, rfid_note = load_metric_networks(
        tuple(lpips), rfid, inception_weights, inception_variant, device
    )
    codecs, results = [], []
    for spec in specs:
        vae = load(spec.path, config=config)
        f = vae.config.downsampling_factor
        if resolution % f:
            raise ValueError(f"--resolution {resolution} is not a multiple of {spec.path}'s downsampling factor {f}")
        latent_shape = (vae.config.latent_channels, resolution // f, resolution // f)
        results.append(ModelResult(
            label=spec.label, path=spec.path, parameters=vae.num_parameters(), latent_shape=latent_shape,
            bits_per_pixel=latent_bits_per_pixel(latent_shape, (resolution, resolution), torch_dtype),
            scaling_factor=vae.config.scaling_factor, shift_factor=vae.config.shift_factor or 0.0,
        ))
        codecs.append(Codec(vae, device=device, dtype=torch_dtype, batch_size=batch_size))

    # No size filter: the benchmark is the whole set, and the protocol resizes every image to `resolution`.
    reader, scan_skipped = open_reader(data, split, image_column, min_size=0)
    skipped = [(image_id(name, data), reason) for name, reason in scan_skipped]
    dataset = EvalImages(reader, resolution, data, limit=max_images)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_named,
        pin_memory=device.type == "cuda",
    )
    fixed = set(fixed_sheet_indices(sheets - sheets // 2, len(dataset)))
    worst_count = sheets // 2
    kept: dict[int, SheetImage] = {}
    original_moments = FeatureMoments()
    reconstruction_moments = {label: FeatureMoments() for label in labels}
    rows: list[dict[str, Any]] = []
    with_ms_ssim = resolution >= MS_SSIM_MIN_SIZE

    bar = tqdm(total=len(dataset), unit="img", desc="eval", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode():
        for batch in loader:
            skipped += batch["skipped"]
            if batch["image"] is None:
                bar.update(len(batch["skipped"]))
                continue
            images = batch["image"].to(device)  # (B, 3, R, R), exact uint8 values in [-1, 1]
            originals = to_uint8(images)
            if inception is not None:
                original_moments.update(inception(images))
            for m, (codec, result) in enumerate(zip(codecs, results, strict=True)):
                measured = reconstruct_and_measure(codec, images, lpips_networks, with_ms_ssim)
                result.codec_seconds += measured.seconds
                result.statistics.update(measured.latents / codec.scaling_factor + codec.shift_factor)  # raw z
                if inception is not None:
                    reconstruction_moments[result.label].update(inception(measured.quantised))
                model_rows = [
                    {"model": result.label, "image": name, **{key: v[i] for key, v in measured.values.items()}}
                    for i, name in enumerate(batch["name"])
                ]
                _keep_for_sheets(kept, fixed, worst_count, batch, originals, measured.reconstructions,
                                 result.label, model_rows, first=m == 0)
                rows += model_rows
            bar.update(len(batch["index"]) + len(batch["skipped"]))  # after the work: the rate is honest
    bar.close()
    if not rows:
        raise ValueError(f"{data}: no image could be read ({len(skipped)} skipped)")
    rows.sort(key=lambda row: labels.index(row["model"]))  # stable: each model's images stay in data order

    rfid_network = inception.description if inception is not None else None
    if inception is not None and original_moments.count < 2:
        rfid_network, rfid_note = None, "rFID skipped: a covariance needs at least 2 images"
    elif inception is not None:
        original_gaussian = original_moments.mean_and_covariance()
        for result in results:
            reconstructed_gaussian = reconstruction_moments[result.label].mean_and_covariance()
            result.rfid = frechet_distance(*original_gaussian, *reconstructed_gaussian)
        if original_moments.count < RFID_RELIABLE_IMAGES:
            rfid_note = (
                f"rFID from {original_moments.count} images (< {RFID_RELIABLE_IMAGES}, Inception's feature "
                "dimension) is strongly biased upwards: compare it only between runs on the same images"
            )
    ms_ssim_note = None if with_ms_ssim else (
        f"MS-SSIM n/a: it needs images of at least {MS_SSIM_MIN_SIZE}x{MS_SSIM_MIN_SIZE} (the 11-tap window after "
        f"four 2x halvings), the resolution is {resolution}"
    )
    return EvaluationResult(
        data=data, resolution=resolution, device=str(device), dtype=dtype, models=results, rows=rows,
        lpips={net: network.backbone_source for net, network in lpips_networks.items()},
        ms_ssim_note=ms_ssim_note, rfid_network=rfid_network, rfid_note=rfid_note, skipped=skipped,
        sheets=sorted(kept.values(), key=lambda sheet: sheet.index), seconds=time.perf_counter() - started,
    )


def _keep_for_sheets(
    kept: dict[int, SheetImage], fixed: set[int], worst_count: int, batch: dict[str, Any],
    originals: torch.Tensor, reconstructions: torch.Tensor, label: str, rows: list[dict[str, Any]], first: bool,
) -> None:
    """Keep this batch's images that a sheet will show: the fixed ones, and the worst so far by PSNR.

    The first model decides which images enter (evicting the least bad of the worst when full); later models
    add their reconstructions to the images already kept.
    """
    for i, index in enumerate(batch["index"]):
        if first and index in fixed:
            kept[index] = SheetImage(index, batch["name"][i], "evenly spaced", originals[i].cpu())
        elif first and _enters_worst(kept, fixed, worst_count, rows[i]["psnr"]):
            kept[index] = SheetImage(index, batch["name"][i], "worst PSNR", originals[i].cpu())
        if index in kept:
            kept[index].metrics[label] = _sheet_metrics(rows[i])
            kept[index].reconstructions[label] = reconstructions[i].cpu()


def _enters_worst(kept: dict[int, SheetImage], fixed: set[int], worst_count: int, value: float) -> bool:
    """Whether an image of this PSNR belongs among the `worst_count` worst; makes room for it if so."""
    if not worst_count:
        return False
    worst = sorted((s for s in kept.values() if s.index not in fixed), key=_first_psnr)
    if len(worst) < worst_count:
        return True
    if value < _first_psnr(worst[-1]):
        del kept[worst[-1].index]
        return True
    return False


def _first_psnr(sheet: SheetImage) -> float:
    return next(iter(sheet.metrics.values()))["psnr"]


def _sheet_metrics(row: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in row.items() if key not in ("model", "image") and value is not None}
