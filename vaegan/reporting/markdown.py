"""Markdown tables, as eval's and the probe's results.md show them: a label column, then numbers right-aligned."""

from __future__ import annotations

from collections.abc import Iterable


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    """A Markdown table: the first column left-aligned (the labels), the others right-aligned (the numbers)."""
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)
