"""Words around numbers in what vaegan prints."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """"1 shard", "2 shards", "0 errors": the count and the noun in the number it takes."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
