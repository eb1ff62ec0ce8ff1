"""VAEs named on a command line: `PATH` or `LABEL=PATH`, each with the label its results are shown under; and
`ENCODER+DECODER`, one model's encoder with another's decoder in the same latent space (a big VAE's latents
decoded by a tiny previewer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelSpec:
    """A VAE to evaluate: the label used in every table and sheet, and where it is loaded from."""

    label: str
    path: str
    decoder_path: str | None = None  # another model's decoder for this one's latents; None: its own

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """`PATH` (label: the folder or file name) or `LABEL=PATH` (unless `spec` is an existing path); a path
        `ENCODER+DECODER` (unless it exists as it is) pairs two models (label: both names)."""
        label, sep, path = spec.partition("=")
        if not (sep and label and "/" not in label and not Path(spec).exists()):
            label, path = "", spec
        encoder, plus, decoder = path.rpartition("+")
        if plus and encoder and decoder and not Path(path).exists():
            return cls(label or f"{_name(encoder)}+{_name(decoder)}", encoder, decoder)
        return cls(label or _name(path), path)


def _name(path: str) -> str:
    stripped = path.rstrip("/")
    return Path(stripped).stem if Path(stripped).is_file() else Path(stripped).name


def parse_model_specs(models: list[str]) -> list[ModelSpec]:
    if not models:
        raise ValueError("give at least one model to evaluate")
    specs = [ModelSpec.parse(spec) for spec in models]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be distinct, got {labels}: name them with LABEL=PATH")
    return specs
