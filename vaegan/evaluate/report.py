"""The files an evaluation leaves behind: numbers to parse, a table to paste, pictures.

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
from pathlib import Path
from typing import Any, get_args

from vaegan.autoencoder.normalization import Convention, LatentNormalization
from vaegan.evaluate.figures import comparison_sheet, per_image_plot, sheet_panels, spectra_plot
from vaegan.evaluate.results import EvaluationResult, ModelResult, aggregate, finite_or_none, metric_title, model_rows
from vaegan.metrics.diagnostics import (
    EQUIVARIANCE_TRANSFORMS,
    HIGH_FREQUENCY_CUTOFF,
    NOISE_LEVELS,
    max_offdiagonal,
)
from vaegan.metrics.reconstruction import MS_SSIM_WEIGHTS
from vaegan.reporting.html import write_html_report
from vaegan.reporting.markdown import markdown_table
from vaegan.utils.files import write_json


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
        "rfid": finite_or_none(model.rfid),
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


def terminal_summary(result: EvaluationResult) -> str:
    """The table and its caveats, for a terminal."""
    lines = [metrics_table(result), result.ms_ssim_note, result.rfid_note]
    if result.skipped:
        lines.append(f"{len(result.skipped)} unreadable images skipped (listed in summary.json)")
    return "\n".join(line for line in lines if line)


def metrics_table(result: EvaluationResult) -> str:
    """One row per model: the metric means, rFID, the latent and its bits per pixel."""
    columns = result.metric_columns
    arrows = {"psnr": "↑", "ssim": "↑", "ms_ssim": "↑"}
    header = ["model", *(f"{metric_title(c)} {arrows.get(c, '↓')}" for c in columns), "rFID ↓", "latent",
              "bits/px", "img/s"]
    body = []
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
        body.append(cells)
    return markdown_table(header, body)


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
    lines = ["# Reconstruction benchmark", "", metrics_table(result), "", *(f"- {note}" for note in notes if note), ""]
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
    body = []
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
        body.append(cells)
    return markdown_table(header, body)
