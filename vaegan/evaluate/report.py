"""What an evaluation measured, and the files it leaves behind: numbers to parse, a table to paste, pictures.

    per_image.csv   one row per (model, image): psnr, ssim, ms_ssim, lpips_<net>, and the latent diagnostics
                    (scale_2x_*, rotation_90_*, noise_<σ>_psnr) (empty cell: n/a)
    summary.json    protocol, metric definitions and, per model, mean/std/min/max of each metric, rFID,
                    latent statistics with suggested factors and channel correlation, the latent diagnostics
                    (equivariance, noise robustness, spectra), bits per pixel, throughput
    results.md      the Markdown tables (reconstruction; latent diagnostics), one row per model, with the protocol
                    and caveats under them
    per_image.png   per-image PSNR and LPIPS of every model, so outliers stand out
    spectra.png     radially averaged power spectra of every model's latents and of the images at their grid
    sheets/*.png    for a few images: original | each model, full image, zoomed crop and error map; beside each,
                    a folder of its panels (original, each reconstruction and error map) for report.html
    report.html     all of it on one page (`vaegan.reporting.html`)
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from vaegan.autoencoder.normalization import Convention, LatentNormalization, LatentStatistics
from vaegan.images.readers import Skip
from vaegan.metrics.diagnostics import (
    EQUIVARIANCE_TRANSFORMS,
    HIGH_FREQUENCY_CUTOFF,
    NOISE_LEVELS,
    ChannelMoments,
    Spectra,
    max_offdiagonal,
)
from vaegan.metrics.reconstruction import MS_SSIM_WEIGHTS
from vaegan.reporting.html import write_html_report
from vaegan.utils.files import write_json

# Error maps share one fixed scale, so sheets of different models and runs compare: |error| of 64 (of 255,
# averaged over RGB) and above is the brightest colour. A good VAE stays far below it; a failure saturates.
ERROR_RANGE = 64.0
# Sheet text stays ASCII: Pillow's built-in font has no glyphs for characters such as "×" or "–".
# Columns narrower than this are upscaled (nearest neighbour, an integer factor) so captions fit.
MIN_COLUMN = 192
HEADER_LINES = 3
LINE_HEIGHT = 16
GAP = 4
BOX_COLOUR = (230, 30, 30)

METRIC_TITLES = {"psnr": "PSNR", "ssim": "SSIM", "ms_ssim": "MS-SSIM"}


@dataclass
class ModelResult:
    """Everything measured for one model besides the per-image rows."""

    label: str
    path: str
    parameters: int
    latent_shape: tuple[int, int, int]  # (C, h, w) at the evaluation resolution
    bits_per_pixel: float
    normalization: LatentNormalization
    statistics: LatentStatistics = field(default_factory=LatentStatistics)  # of the raw latents z
    normalised_statistics: LatentStatistics = field(default_factory=LatentStatistics)  # what a diffusion model sees
    codec_seconds: float = 0.0  # encode + decode, summed over batches
    rfid: float | None = None
    channels: ChannelMoments = field(default_factory=ChannelMoments)  # of the raw latents z
    spectra: Spectra = field(default_factory=Spectra)  # of the normalised latents, and the images at their grid
    diagnostics_seconds: float = 0.0


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
    """What `evaluate` measured; `vaegan.evaluate.report` turns it into files."""

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
    diagnostics: bool = False  # whether the latent diagnostics were measured

    @property
    def num_images(self) -> int:
        return len({row["image"] for row in self.rows})

    @property
    def metric_columns(self) -> list[str]:
        return ["psnr", "ssim", "ms_ssim", *(f"lpips_{net}" for net in self.lpips)]

    @property
    def diagnostic_columns(self) -> list[str]:
        """The per-image latent diagnostics in the rows: equivariance PSNR and LPIPS, noise robustness PSNR."""
        if not self.diagnostics:
            return []
        equivariance = [f"{kind}_{metric}" for kind in EQUIVARIANCE_TRANSFORMS
                        for metric in ("psnr", *(f"lpips_{net}" for net in self.lpips))]
        return [*equivariance, *(f"noise_{level:g}_psnr" for level in NOISE_LEVELS)]

    def __str__(self) -> str:
        """The table and its caveats, for a terminal."""
        lines = [markdown_table(self), self.ms_ssim_note, self.rfid_note]
        if self.skipped:
            lines.append(f"{len(self.skipped)} unreadable images skipped (listed in summary.json)")
        return "\n".join(line for line in lines if line)


def metric_title(column: str) -> str:
    """"lpips_alex" -> "LPIPS-alex": the backbone is always named, the numbers differ between them."""
    return METRIC_TITLES.get(column) or f"LPIPS-{column.removeprefix('lpips_')}"


def write_report(result: EvaluationResult, output: str | Path) -> dict[str, Path]:
    """Write every report file into `output`; returns their paths by kind."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.md").write_text(markdown_report(result))
    paths = {
        "csv": write_per_image_csv(result, output / "per_image.csv"),
        "summary": write_json(output / "summary.json", summary(result)),
        "markdown": output / "results.md",
        "plot": per_image_plot(result, output / "per_image.png"),
    }
    if result.diagnostics:
        paths["spectra"] = spectra_plot(result, output / "spectra.png")
    sheet_folder = output / "sheets"
    sheet_folder.mkdir(exist_ok=True)
    for sheet in result.sheets:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(sheet.name).stem)[:60]
        path = sheet_folder / f"{sheet.index:05d}_{stem}.png"
        comparison_sheet(sheet, [m.label for m in result.models], result.lpips).save(path)
        sheet_panels(sheet, [m.label for m in result.models], sheet_folder / path.stem)
        paths[f"sheet {sheet.index}"] = path
    paths["html"] = write_html_report(output)  # last: it shows every file written above
    return paths


def write_per_image_csv(result: EvaluationResult, path: Path) -> Path:
    columns = ["model", "image", *result.metric_columns, *result.diagnostic_columns]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        for row in result.rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in columns})
    return path


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return "" if value is None else value


def _finite(value: float | None) -> float | None:
    """JSON has no inf/NaN: PSNR of an exact reconstruction (inf) is reported as null."""
    return value if value is not None and math.isfinite(value) else None


def aggregate(values: list[float | None]) -> dict[str, float | None] | None:
    """mean, std, min, max over images (None when the metric is n/a); inf values (exact copies) count."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    array = np.asarray(present, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        stats = {"mean": array.mean(), "std": array.std(), "min": array.min(), "max": array.max()}
    return {key: _finite(float(value)) for key, value in stats.items()}


def model_rows(result: EvaluationResult, label: str) -> list[dict[str, Any]]:
    return [row for row in result.rows if row["model"] == label]


def model_summary(result: EvaluationResult, model: ModelResult) -> dict[str, Any]:
    rows = model_rows(result, model.label)
    statistics = model.statistics
    mean, std = statistics.overall()
    normalised_mean, normalised_std = model.normalised_statistics.overall()
    correlation = model.channels.correlation() if model.channels.moments.count >= 2 else None
    return {
        "name": model.label,
        "path": model.path,
        "parameters": model.parameters,
        "metrics": {column: aggregate([row[column] for row in rows]) for column in result.metric_columns},
        "rfid": _finite(model.rfid),
        "latent": {
            "shape": list(model.latent_shape),
            "dtype": result.dtype,
            "bits_per_pixel": model.bits_per_pixel,
            "compression_vs_rgb8": 24.0 / model.bits_per_pixel,
            **model.normalization.to_json(),
            "raw_channel_mean": statistics.mean.tolist(),
            "raw_channel_std": statistics.channel_std.tolist(),
            "raw_mean": mean,
            "raw_std": std,
            "normalised_mean": normalised_mean,
            "normalised_std": normalised_std,
            "suggested_factors": {
                convention: LatentNormalization.fit(statistics, "scalar", convention).to_json()
                for convention in get_args(Convention)
            },
            "channel_correlation": None if correlation is None else correlation.tolist(),
            "max_channel_correlation": None if correlation is None else max_offdiagonal(correlation),
        },
        "diagnostics": diagnostics_summary(result, model, rows) if result.diagnostics else None,
        "images_per_second": len(rows) / model.codec_seconds if model.codec_seconds else None,
    }


def diagnostics_summary(result: EvaluationResult, model: ModelResult, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The latent diagnostics of one model: mean/std/min/max over images, and the spectra."""
    lpips = [f"lpips_{net}" for net in result.lpips]
    return {
        "equivariance": {
            kind: {metric: aggregate([row[f"{kind}_{metric}"] for row in rows]) for metric in ("psnr", *lpips)}
            for kind in EQUIVARIANCE_TRANSFORMS
        },
        "noise_robustness": {
            f"{level:g}": {"psnr": aggregate([row[f"noise_{level:g}_psnr"] for row in rows])} for level in NOISE_LEVELS
        },
        "spectrum": model.spectra.summary(),
        "seconds": round(model.diagnostics_seconds, 2),
    }


def summary(result: EvaluationResult) -> dict[str, Any]:
    """Everything in the report, as data."""
    return {
        "protocol": {
            "data": result.data,
            "images": result.num_images,
            "resolution": result.resolution,
            "crop": f"shorter side resized to {result.resolution} (antialiased bicubic), centre crop",
            "reconstruction": "posterior mean, decoded once, rounded to uint8; metrics on uint8 images",
            "device": result.device,
            "dtype": result.dtype,
            "seconds": round(result.seconds, 2),
            "skipped": [{"image": name, "reason": reason} for name, reason in result.skipped],
        },
        "metrics": {
            "psnr": "dB on uint8 RGB, per image, then averaged",
            "ssim": "11-tap Gaussian window (sigma 1.5), per channel, valid region (scikit-image convention)",
            "ms_ssim": result.ms_ssim_note or (
                f"5 scales, weights {list(MS_SSIM_WEIGHTS)}, 11-tap Gaussian, 2x average pooling "
                "(TensorFlow / pytorch-msssim convention)"
            ),
            "lpips": {net: f"LPIPS v0.1 linear heads, backbone weights from {source}"
                      for net, source in result.lpips.items()},
            "rfid": result.rfid_network,
            "rfid_note": result.rfid_note,
            "bits_per_pixel": f"latent C*h*w * bits({result.dtype}) / (H*W); uncompressed RGB is 24",
            "channel_correlation": "Pearson correlation between the raw latent channels over all positions",
            "diagnostics": DIAGNOSTICS_DEFINITIONS if result.diagnostics else "not measured (--diagnostics false)",
        },
        "models": [model_summary(result, model) for model in result.models],
        "sheets": [{"index": s.index, "image": s.name, "selected": s.selected} for s in result.sheets],
    }


DIAGNOSTICS_DEFINITIONS = {
    "scale_2x": "decode of the normalised latent downscaled 2x (bilinear, antialiased) against the image downscaled "
                "2x the same way; PSNR (dB) and LPIPS on uint8",
    "rotation_90": "decode of the latent rotated by 90 degrees against the rotated image; PSNR and LPIPS on uint8",
    "noise_robustness": "PSNR of the decode of z + sigma * std(z) * eps against the decode of z, std over each "
                        "image's latent, eps seeded by the image's index",
    "spectrum": "radially averaged power spectrum (per-plane mean removed, share of the total power per ring of "
                "radius k/n cycles per latent pixel) of the normalised latents and of the images resized to the "
                "latent's grid; high_frequency_share: power above "
                f"{HIGH_FREQUENCY_CUTOFF} cycles per pixel (half the Nyquist frequency) over all power",
}


def markdown_table(result: EvaluationResult) -> str:
    """One row per model: the metric means, rFID, the latent and its bits per pixel."""
    columns = result.metric_columns
    arrows = {"psnr": "↑", "ssim": "↑", "ms_ssim": "↑"}
    header = ["model", *(f"{metric_title(c)} {arrows.get(c, '↓')}" for c in columns), "rFID ↓", "latent",
              "bits/px", "img/s"]
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    for model in result.models:
        rows = model_rows(result, model.label)
        cells = [model.label]
        for column in columns:
            stats = aggregate([row[column] for row in rows])
            digits = 2 if column == "psnr" else 4
            cells.append("n/a" if stats is None or stats["mean"] is None else f"{stats['mean']:.{digits}f}")
        cells.append("n/a" if model.rfid is None else f"{model.rfid:.2f}")
        channels, height, width = model.latent_shape
        cells.append(f"{channels}×{height}×{width}")
        cells.append(f"{model.bits_per_pixel:g}")
        cells.append(f"{len(rows) / model.codec_seconds:.1f}" if model.codec_seconds else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: EvaluationResult) -> str:
    notes = [
        f"{result.num_images} images of `{result.data}` at {result.resolution}×{result.resolution} (shorter side "
        f"resized, centre crop); VAEs in {result.dtype} on {result.device}; metrics on the uint8 reconstructions.",
        "LPIPS: " + ", ".join(f"{net} backbone from {source}" for net, source in result.lpips.items())
        if result.lpips else "LPIPS: not computed.",
        f"rFID: {result.rfid_network}." if result.rfid_network else "",
        result.rfid_note or "",
        result.ms_ssim_note or "",
        f"bits/px: the latent at {result.dtype} per image pixel (RGB: 24); img/s: encode + decode.",
        f"{len(result.skipped)} unreadable images skipped (see summary.json)." if result.skipped else "",
    ]
    lines = ["# Reconstruction benchmark", "", markdown_table(result), "", *(f"- {note}" for note in notes if note), ""]
    if result.diagnostics:
        lines += ["## Latent diagnostics", "", diagnostics_table(result), "", *(
            f"- {note}" for note in (
                "½×: decode of the latent downscaled 2× against the image downscaled 2×; 90°: decode of the rotated "
                "latent against the rotated image (equivariance: what EQ-VAE and scale equivariance train).",
                "noise σ: PSNR of the decode of z + σ·std(z)·ε against the decode of z.",
                f"HF share: power above {HIGH_FREQUENCY_CUTOFF} cycles/pixel (half the Nyquist frequency) in the "
                "normalised latents / in the images at the latent's grid (spectra.png).",
                "max channel corr.: the largest |correlation| between two latent channels.",
            )
        ), ""]
    return "\n".join(lines)


def diagnostics_table(result: EvaluationResult) -> str:
    """One row per model: equivariance error, noise robustness, high-frequency shares, channel correlation."""
    first_lpips = [f"lpips_{net}" for net in result.lpips][:1]
    header = ["model"]
    for title in ("½×", "90°"):
        header += [f"{title} PSNR ↑", *(f"{title} {metric_title(c)} ↓" for c in first_lpips)]
    header += [f"noise {level:g} PSNR ↑" for level in NOISE_LEVELS]
    header += ["HF share latent / image", "max channel corr."]
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    for model in result.models:
        rows = model_rows(result, model.label)
        cells = [model.label]
        columns = [f"{kind}_{metric}" for kind in EQUIVARIANCE_TRANSFORMS for metric in ("psnr", *first_lpips)]
        columns += [f"noise_{level:g}_psnr" for level in NOISE_LEVELS]
        for column in columns:
            stats = aggregate([row[column] for row in rows])
            digits = 2 if column.endswith("psnr") else 4
            cells.append("n/a" if stats is None or stats["mean"] is None else f"{stats['mean']:.{digits}f}")
        spectrum = model.spectra.summary()
        cells.append(f"{spectrum['latent_high_frequency_share']:.3f} / {spectrum['image_high_frequency_share']:.3f}")
        correlation = model.channels.correlation() if model.channels.moments.count >= 2 else None
        cells.append("n/a" if correlation is None else f"{max_offdiagonal(correlation):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- pictures ----


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_pil(image: torch.Tensor, size: int) -> Image.Image:
    """uint8 (3, H, W) -> RGB image upscaled (nearest neighbour) to size x size: pixels stay visible."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    return pil.resize((size, size), Image.Resampling.NEAREST) if pil.size != (size, size) else pil


def error_map(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """|original - reconstruction| averaged over RGB, uint8 (3, H, W) -> float (H, W) in grey levels."""
    return (original.float() - reconstruction.float()).abs().mean(dim=0)


def colourise(error: torch.Tensor) -> torch.Tensor:
    """(H, W) grey-level errors -> uint8 (3, H, W) through the magma colour map, 0..ERROR_RANGE."""
    from matplotlib import colormaps

    rgba = colormaps["magma"]((error / ERROR_RANGE).clamp(0, 1).numpy())  # (H, W, 4) floats
    return torch.from_numpy((rgba[..., :3] * 255).round().astype(np.uint8)).permute(2, 0, 1)


def worst_window(sheet: SheetImage, size: int) -> tuple[int, int]:
    """(top, left) of the size x size window with the largest error summed over all models."""
    total = sum(error_map(sheet.original, r) for r in sheet.reconstructions.values())
    if not torch.is_tensor(total):
        return 0, 0
    stride = max(1, size // 4)
    pooled = F.avg_pool2d(total[None, None], size, stride=stride)[0, 0]  # (rows, cols) of windows
    row, col = divmod(int(pooled.argmax()), pooled.shape[1])
    return row * stride, col * stride


def comparison_sheet(sheet: SheetImage, labels: list[str], lpips: dict[str, str]) -> Image.Image:
    """original | model 1 | model 2 ...: the full image, a zoomed crop (red box) and the error map.

    The crop is the window where the models err most together, so the eye goes where they differ.
    """
    side = sheet.original.shape[-1]
    column = side * max(1, math.ceil(MIN_COLUMN / side))
    crop = max(8, side // 4)
    top, left = worst_window(sheet, crop)
    scale = column / side
    header = HEADER_LINES * LINE_HEIGHT + GAP
    footer = LINE_HEIGHT + GAP
    width = (1 + len(labels)) * (column + GAP) + GAP
    height = header + 3 * (column + GAP) + footer
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    first_lpips = next(iter(lpips), None)

    panels = [("original", sheet.original, [Path(sheet.name).name, f"{side}x{side}"])]
    for label in labels:
        metrics = sheet.metrics.get(label, {})
        caption = [f"PSNR {metrics['psnr']:.2f} dB" if "psnr" in metrics else ""]
        if first_lpips and f"lpips_{first_lpips}" in metrics:
            caption.append(f"LPIPS-{first_lpips} {metrics[f'lpips_{first_lpips}']:.3f}")
        panels.append((label, sheet.reconstructions[label], caption))

    for i, (title, image, caption) in enumerate(panels):
        x = GAP + i * (column + GAP)
        for line, text in enumerate([title, *caption]):
            draw.text((x, GAP + line * LINE_HEIGHT), _fit(draw, text, font, column), fill=(0, 0, 0), font=font)
        for row in range(3):  # a thin frame, so a white sky does not melt into the background
            top_edge = header + row * (column + GAP)
            draw.rectangle([x - 1, top_edge - 1, x + column, top_edge + column], outline=(190, 190, 190))
        y = header
        canvas.paste(_to_pil(image, column), (x, y))
        box = [x + left * scale, y + top * scale, x + (left + crop) * scale - 1, y + (top + crop) * scale - 1]
        draw.rectangle(box, outline=BOX_COLOUR, width=2)
        y += column + GAP
        canvas.paste(_to_pil(image[:, top:top + crop, left:left + crop], column), (x, y))
        y += column + GAP
        if i == 0:
            _draw_legend(draw, canvas, x, y, column, font)
        else:
            canvas.paste(_to_pil(colourise(error_map(sheet.original, image)), column), (x, y))
    footer_text = f"rows: image, red box zoomed x{column / crop:g}, |error| 0-{ERROR_RANGE:g} of 255"
    draw.text((GAP, height - footer + 2), _fit(draw, footer_text, font, width - 2 * GAP), fill=(80, 80, 80),
              font=font)
    return canvas


def sheet_panels(sheet: SheetImage, labels: list[str], folder: Path) -> None:
    """A sheet's panels as separate files, for report.html's side-by-side zoom: 0-original.png, then for the n-th
    model n-LABEL.png and n-LABEL.error.png (its error map on the sheets' fixed scale)."""
    folder.mkdir(exist_ok=True)
    Image.fromarray(sheet.original.permute(1, 2, 0).numpy()).save(folder / "0-original.png")
    for number, label in enumerate(labels, start=1):
        name, image = re.sub(r"[^A-Za-z0-9._-]+", "_", label), sheet.reconstructions[label]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{number}-{name}.png")
        error = colourise(error_map(sheet.original, image))
        Image.fromarray(error.permute(1, 2, 0).numpy()).save(folder / f"{number}-{name}.error.png")


def _draw_legend(draw: ImageDraw.ImageDraw, canvas: Image.Image, x: int, y: int, size: int, font) -> None:
    """The colour scale of the error maps, in the original's (empty) error cell."""
    bar = colourise(torch.linspace(0, ERROR_RANGE, size)[None].expand(LINE_HEIGHT, -1))
    canvas.paste(Image.fromarray(bar.permute(1, 2, 0).numpy()), (x, y + size // 2))
    draw.text((x, y + size // 2 - LINE_HEIGHT - 2), "|error| (mean over RGB)", fill=(0, 0, 0), font=font)
    draw.text((x, y + size // 2 + LINE_HEIGHT + 2), "0", fill=(0, 0, 0), font=font)
    label = f"{ERROR_RANGE:g}+"
    draw.text((x + size - draw.textlength(label, font=font), y + size // 2 + LINE_HEIGHT + 2), label,
              fill=(0, 0, 0), font=font)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten text with an ellipsis until it fits the column."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def per_image_plot(result: EvaluationResult, path: Path, annotate: int = 3) -> Path:
    """Per-image PSNR (and LPIPS for each backbone) of every model, in data order; the worst are labelled."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    labels = [m.label for m in result.models]
    images = [row["image"] for row in model_rows(result, labels[0])]
    columns = ["psnr", *(f"lpips_{net}" for net in result.lpips)]
    figure = Figure(figsize=(min(20.0, max(8.0, 0.3 * len(images))), 2.8 * len(columns) + 0.8), layout="constrained")
    axes = figure.subplots(len(columns), 1, sharex=True, squeeze=False)[:, 0]
    x = np.arange(len(images))
    for axis, column in zip(axes, columns, strict=True):
        for label in labels:
            values = [row[column] for row in model_rows(result, label)]
            axis.plot(x, [np.nan if v is None else v for v in values], marker="o", markersize=3, linewidth=0.8,
                      label=label)
        lower_is_worse = column == "psnr"
        axis.set_ylabel(f"{metric_title(column)} {'↑' if lower_is_worse else '↓'}")
        axis.grid(alpha=0.3)
        reference = [row[column] for row in model_rows(result, labels[0])]
        order = np.argsort(reference if lower_is_worse else [-v for v in reference])[:annotate]
        for i in order:
            axis.annotate(Path(images[i]).name, (x[i], reference[i]), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
    axes[0].legend(loc="best", fontsize=8)
    axes[0].set_title(f"{result.num_images} images of {result.data} at {result.resolution}²; "
                      f"worst {annotate} of {labels[0]} labelled", fontsize=9)
    if len(images) <= 60:
        axes[-1].set_xticks(x, [Path(name).name for name in images], rotation=90, fontsize=6)
    else:
        axes[-1].set_xlabel("image (data order)")
    figure.savefig(path, dpi=120)
    return path


def spectra_plot(result: EvaluationResult, path: Path) -> Path:
    """Every model's latent spectrum (solid) on one figure, with the images' at each latent grid (dashed)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axis = figure.subplots()
    image_grids_drawn = set()
    for model in result.models:
        spectrum = model.spectra.summary()
        axis.plot(spectrum["frequencies"], spectrum["latent"], marker="o", markersize=2.5, linewidth=1.2,
                          label=f"{model.label} latent (HF {spectrum['latent_high_frequency_share']:.2f})")
        grid = model.latent_shape[1:]
        if grid not in image_grids_drawn:
            image_grids_drawn.add(grid)
            axis.plot(spectrum["frequencies"], spectrum["image"], linestyle="--", linewidth=1.2, color="0.35",
                      label=f"images at {grid[0]}×{grid[1]} (HF {spectrum['image_high_frequency_share']:.2f})")
    axis.axvline(HIGH_FREQUENCY_CUTOFF, color="0.7", linewidth=0.8)
    axis.set_yscale("log")
    axis.set_xlabel("frequency (cycles per latent pixel)")
    axis.set_ylabel("share of the power per ring (log)")
    axis.set_title(f"radially averaged power spectra, {result.num_images} images of {result.data} at "
                   f"{result.resolution}²; HF: share above {HIGH_FREQUENCY_CUTOFF}", fontsize=9)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=120)
    return path
