"""The reconstruction benchmark: several VAEs, one image set, the protocol of the papers.

Protocol (what the latent-diffusion and VAE papers report, e.g. on ImageNet val or COCO at 256):
- every image has its shorter side resized to `resolution` (antialiased bicubic) and is centre-cropped square;
- each VAE encodes it to the posterior mean through the frozen `Codec` and decodes it back;
- the reconstruction is rounded to uint8, as a PNG would hold it, and every metric is computed on that
  uint8 image against the uint8 original: PSNR per image then averaged, SSIM (11-tap Gaussian), MS-SSIM
  (five scales, where the size allows), LPIPS per backbone, and rFID over the whole set.

The loop goes batch by batch and, within a batch, model by model, so the images are read and cropped once and
every model sees the same tensors; each model decodes each image once and all metrics come from that decode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vaegan.autoencoder.codec import Codec
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.evaluate.report import terminal_summary, write_report
from vaegan.evaluate.results import EvaluationResult, ModelResult, SheetImage
from vaegan.formats.load import load
from vaegan.formats.specs import ModelSpec, parse_model_specs
from vaegan.images.convert import to_uint8
from vaegan.images.readers import EvalCrop, ImageReader, Skip, open_reader
from vaegan.images.reading import ImageError
from vaegan.metrics.diagnostics import equivariance_errors, noise_robustness
from vaegan.metrics.distribution import FeatureMoments, frechet_distance
from vaegan.metrics.reconstruction import MS_SSIM_MIN_SIZE, latent_bits_per_pixel, ms_ssim, psnr, ssim
from vaegan.pretrained.inception import InceptionFeatures, InceptionVariant, MissingInceptionWeights
from vaegan.pretrained.lpips import PerceptualLoss
from vaegan.utils.dtypes import resolve_dtype

# rFID from fewer images than feature dimensions (2048) has a rank-deficient covariance and a large positive
# bias; the number is still reported (papers use 50,000 ImageNet images), with this warning beside it.
RFID_RELIABLE_IMAGES = 2048


class EvalImages(Dataset):
    """Item i: `{"index", "name", "image": (3, R, R) in [-1, 1]}`, or `{"index", "name", "error"}`.

    Unlike training, a bad image is reported and left out, never replaced by its neighbour: a benchmark must
    not count an image twice.
    """

    def __init__(self, reader: ImageReader, resolution: int, limit: int | None = None):
        self.reader, self.crop = reader, EvalCrop(resolution)
        self.length = len(reader) if limit is None else min(limit, len(reader))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.reader.id(index)  # a file's path relative to the data folder: the same on every machine
        try:
            return {"index": index, "name": name, "image": self.crop(self.reader.read(index))}
        except ImageError as error:
            return {"index": index, "name": name, "error": str(error)}


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
    codec: Codec | EncoderDecoder, images: torch.Tensor, lpips_networks: dict[str, PerceptualLoss], with_ms_ssim: bool
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
    *,
    models: list[str],
    data: str,
    output: str | None = None,
    resolution: int = 256,
    device: str | None = None,
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    batch_size: int = 8,
    max_images: int | None = None,
    min_size: int | None = None,
    lpips: tuple[Literal["alex", "vgg", "squeeze"], ...] = ("alex",),
    rfid: bool = True,
    inception_weights: str | None = None,
    inception_variant: InceptionVariant = "auto",
    sheets: int = 6,
    split: str = "train",
    image_column: str = "image",
    num_workers: int = 2,
    preset: str | None = None,
    diagnostics: bool = True,
    progress: bool = True,
) -> EvaluationResult:
    """Benchmark VAEs side by side on the same images: PSNR, SSIM, MS-SSIM, LPIPS, rFID, latent statistics.

    Every image is reconstructed with every VAE and measured (shorter side resized, centre crop, posterior mean,
    uint8); with `output`, per_image.csv, summary.json, results.md, per_image.png and sheets/ are written there.

    Args:
        models: VAEs in any format `vaegan.load` reads, tiny autoencoders included, as PATH or LABEL=PATH (the
            label names it in the report; default: the file or folder name); ENCODER+DECODER decodes one model's
            latents with another's decoder (a big VAE's with its tiny previewer). The first picks the worst
            images for the sheets.
        data: images: a folder (recursively) or a datasets source (imagefolder:PATH, a save_to_disk folder, a
            hub name).
        output: folder for the report files; None only returns the result.
        resolution: side of the square crop; 256 is the usual benchmark size.
        device: cpu, cuda, cuda:1 ...; default: cuda when available.
        dtype: the VAEs' precision, and the one the latent's bits per pixel count; metric networks always run
            in fp32.
        batch_size: images per forward pass.
        max_images: only the first N images (in the source's sorted order).
        min_size: images whose shorter side is below this are skipped and listed in summary.json, as
            `vaegan encode` refuses them: scoring an image upscaled many times over measures the upscaling. Default:
            half the resolution, as encode's.
        lpips: LPIPS backbones: alex is the usual evaluation metric; vgg (what the SD recipe trains with) needs
            vgg16_features.safetensors in $VAEGAN_WEIGHTS_DIR. A missing one stops the run before any work; an
            empty list skips LPIPS.
        rfid: compute rFID when Inception weights are found.
        inception_weights: Inception-v3 weights for rFID (safetensors); default:
            $VAEGAN_WEIGHTS_DIR/inception_v3_features.safetensors, else rFID is skipped with a note.
        inception_variant: which Inception the weights belong to; auto tells from the classifier's size.
        sheets: images with a comparison sheet: half evenly spaced, half the worst by the first model's PSNR.
        split: split of a datasets source.
        image_column: image column of a datasets source.
        num_workers: image decoding processes.
        preset: architecture preset (sd, sdxl, sd3, flux, flux2, mini) for model files that carry no config.
        diagnostics: the latent diagnostics (`vaegan.metrics.diagnostics`): equivariance error, noise robustness, latent
            and image spectra (spectra.png), channel correlation. Four more decodes per image, one at full size
            and a quarter of one for the downscale; channel statistics are always measured.
        progress: show a progress bar with images/s, and the table at the end.
    """
    specs = parse_model_specs(models)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    lpips_networks, inception, rfid_note = load_metric_networks(
        tuple(lpips), rfid, inception_weights, inception_variant, device
    )
    codecs, results = open_models(specs, resolution, device, resolve_dtype(dtype), batch_size, preset)

    reader, scan_skipped = open_reader(data, split, image_column, min_size=resolution // 2 if min_size is None
                                       else min_size)
    dataset = EvalImages(reader, resolution, limit=max_images)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_named,
        pin_memory=device.type == "cuda",
    )
    run = _Run(codecs, results, lpips_networks, inception, resolution >= MS_SSIM_MIN_SIZE, sheets, len(dataset),
               diagnostics)
    run.skipped += scan_skipped
    # The bar closes on the way out of a failure too, so an error is printed on a line of its own.
    with tqdm(total=len(dataset), unit="img", desc="eval", disable=not progress, dynamic_ncols=True) as bar:
        with torch.inference_mode():
            for batch in loader:
                run.add(batch, device)
                bar.update(len(batch["index"]) + len(batch["skipped"]))  # after the work: the rate is honest
    if not run.rows:
        raise ValueError(f"{data}: no image could be read ({len(run.skipped)} skipped)")
    run.rows.sort(key=lambda row: [spec.label for spec in specs].index(row["model"]))  # stable: data order kept

    rfid_network, rfid_note = run.finish_rfid(rfid_note)
    ms_ssim_note = None if run.with_ms_ssim else (
        f"MS-SSIM n/a: it needs images of at least {MS_SSIM_MIN_SIZE}x{MS_SSIM_MIN_SIZE} (the 11-tap window after "
        f"four 2x halvings), the resolution is {resolution}"
    )
    result = EvaluationResult(
        data=data, resolution=resolution, device=str(device), dtype=dtype, models=results, rows=run.rows,
        lpips={net: network.backbone_source for net, network in lpips_networks.items()},
        ms_ssim_note=ms_ssim_note, rfid_network=rfid_network, rfid_note=rfid_note, skipped=run.skipped,
        sheets=sorted(run.kept.values(), key=lambda sheet: sheet.index), seconds=time.perf_counter() - started,
        diagnostics=diagnostics,
    )
    if output is not None:
        paths = write_report(result, output)
        if progress:
            print(terminal_summary(result))
            spectra = " spectra.png," if diagnostics else ""
            print(f"wrote {len(paths)} files to {output} (results.md, summary.json, per_image.csv, "
                  f"per_image.png,{spectra} sheets/) in {result.seconds:.0f} s")
    return result


def open_models(
    specs: list[ModelSpec], resolution: int, device: torch.device, dtype: torch.dtype, batch_size: int,
    preset: str | None,
) -> tuple[list[Codec | EncoderDecoder], list[ModelResult]]:
    """A codec per model, and the result each fills, with what is known before any image is read."""
    codecs, results = [], []
    for spec in specs:
        vae = load(spec.path, config=preset)
        f = vae.config.downsampling_factor
        if resolution % f:
            raise ValueError(f"--resolution {resolution} is not a multiple of {spec.path}'s downsampling factor {f}")
        latent_shape = (vae.config.latent_channels, resolution // f, resolution // f)
        codec = Codec(vae, device=device, dtype=dtype, batch_size=batch_size)
        parameters = vae.num_parameters()
        if spec.decoder_path is not None:
            decoder = Codec(load(spec.decoder_path, config=preset), device=device, dtype=dtype, batch_size=batch_size)
            codec = EncoderDecoder(codec, decoder, spec)
            parameters = _part_parameters(codec.encoder.vae, "encoder") + _part_parameters(decoder.vae, "decoder")
        results.append(ModelResult(
            label=spec.label, path=spec.path if spec.decoder_path is None else f"{spec.path}+{spec.decoder_path}",
            parameters=parameters, latent_shape=latent_shape,
            bits_per_pixel=latent_bits_per_pixel(latent_shape, (resolution, resolution), dtype),
            normalization=LatentNormalization.of(vae),
        ))
        codecs.append(codec)
    return codecs, results


class EncoderDecoder:
    """One model's encoder and another's decoder on the same normalised latents: how a previewer is judged (a big
    VAE's latents through a tiny decoder), or a tiny encoder (its latents through the big decoder)."""

    def __init__(self, encoder: Codec, decoder: Codec, spec: ModelSpec):
        if (encoder.latent_channels, encoder.factor) != (decoder.latent_channels, decoder.factor):
            raise ValueError(
                f"--models {spec.path}+{spec.decoder_path}: {spec.path} makes {encoder.latent_channels}-channel "
                f"latents at 1/{encoder.factor}, but {spec.decoder_path} decodes {decoder.latent_channels} channels at "
                f"1/{decoder.factor}; pair models of one latent space")
        self.encoder, self.decoder = encoder, decoder
        self.normalization = encoder.normalization

    def encode(self, images, **options) -> torch.Tensor:
        return self.encoder.encode(images, **options)

    def decode(self, latents: torch.Tensor, **options):
        return self.decoder.decode(latents, **options)


def _part_parameters(model: torch.nn.Module, part: str) -> int:
    return sum(p.numel() for p in getattr(model, part).parameters())


class _Run:
    """What the loop over batches accumulates: per-image rows, latent and Inception statistics, sheet images.

    The images that the comparison sheets show are kept as the loop runs (a fixed, evenly spaced set and the
    worst by the first model's PSNR), so nothing is decoded twice and memory does not grow with the data set.
    """

    def __init__(self, codecs: list[Codec | EncoderDecoder], results: list[ModelResult],
                 lpips_networks: dict[str, PerceptualLoss],
                 inception: InceptionFeatures | None, with_ms_ssim: bool, sheets: int, num_images: int,
                 diagnostics: bool):
        self.codecs, self.results, self.lpips_networks = codecs, results, lpips_networks
        self.inception, self.with_ms_ssim, self.diagnostics = inception, with_ms_ssim, diagnostics
        self.fixed = set(fixed_sheet_indices(sheets - sheets // 2, num_images))
        self.worst_count = sheets // 2
        self.kept: dict[int, SheetImage] = {}
        self.original_moments = FeatureMoments()
        self.reconstruction_moments = {result.label: FeatureMoments() for result in results}
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[Skip] = []

    def add(self, batch: dict[str, Any], device: torch.device) -> None:
        """Measure every model on one batch of images."""
        self.skipped += batch["skipped"]
        if batch["image"] is None:
            return
        images = batch["image"].to(device)  # (B, 3, R, R), exact uint8 values in [-1, 1]
        originals = to_uint8(images)
        if self.inception is not None:
            self.original_moments.update(self.inception(images))
        for m, (codec, result) in enumerate(zip(self.codecs, self.results, strict=True)):
            measured = reconstruct_and_measure(codec, images, self.lpips_networks, self.with_ms_ssim)
            result.codec_seconds += measured.seconds
            result.normalised_statistics.update(measured.latents)
            result.statistics.update(codec.normalization.denormalize(measured.latents))
            result.channels.update(codec.normalization.denormalize(measured.latents))
            if self.diagnostics:
                tick = time.perf_counter()
                measured.values |= equivariance_errors(codec.decode, images, measured.latents, self.lpips_networks)
                measured.values |= noise_robustness(codec.decode, measured.latents, measured.reconstructions,
                                                    batch["index"])
                result.spectra.update(measured.latents, images)
                result.diagnostics_seconds += time.perf_counter() - tick
            if self.inception is not None:
                self.reconstruction_moments[result.label].update(self.inception(measured.quantised))
            model_rows = [
                {"model": result.label, "image": name, **{key: v[i] for key, v in measured.values.items()}}
                for i, name in enumerate(batch["name"])
            ]
            _keep_for_sheets(self.kept, self.fixed, self.worst_count, batch, originals, measured.reconstructions,
                             result.label, model_rows, first=m == 0)
            self.rows += model_rows

    def finish_rfid(self, note: str | None) -> tuple[str | None, str | None]:
        """Fill every model's rFID; returns (the network that measured it, a note about it)."""
        if self.inception is None:
            return None, note
        if self.original_moments.count < 2:
            return None, "rFID skipped: a covariance needs at least 2 images"
        original_gaussian = self.original_moments.mean_and_covariance()
        for result in self.results:
            reconstructed_gaussian = self.reconstruction_moments[result.label].mean_and_covariance()
            result.rfid = frechet_distance(*original_gaussian, *reconstructed_gaussian)
        if self.original_moments.count < RFID_RELIABLE_IMAGES:
            note = (
                f"rFID from {self.original_moments.count} images (< {RFID_RELIABLE_IMAGES}, Inception's feature "
                "dimension) is strongly biased upwards: compare it only between runs on the same images"
            )
        return self.inception.description, note


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
