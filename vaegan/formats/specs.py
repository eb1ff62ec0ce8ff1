"""VAEs named on a command line: `PATH` or `LABEL=PATH`, each with the label its results are shown under."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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


def parse_model_specs(models: list[str]) -> list[ModelSpec]:
    if not models:
        raise ValueError("give at least one model to evaluate")
    specs = [ModelSpec.parse(spec) for spec in models]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be distinct, got {labels}: name them with LABEL=PATH")
    return specs
