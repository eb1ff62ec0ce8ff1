"""The pictures of an evaluation: comparison sheets with zoomed crops and error maps, their panels for
report.html, the per-image plot and the latent spectra."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from vaegan.evaluate.results import EvaluationResult, SheetImage, metric_title, model_rows
from vaegan.metrics.diagnostics import (
    HIGH_FREQUENCY_CUTOFF,
)

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
