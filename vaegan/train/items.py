"""How a training dataset is asked for an item, and what it does when the item's image is bad."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch

from vaegan.images.readers import Skip
from vaegan.images.reading import ImageError

# How many following indices a map-style dataset tries before concluding the source is all bad.
MAX_FALLBACKS = 100

Item = TypeVar("Item")


class Sample(NamedTuple):
    """A training item as the sampler hands it out: which image, and the seed of its random crop and flip."""

    index: int
    seed: int


def first_readable(
    index: int, size: int, bad: set[int], read: Callable[[int], Item], name: Callable[[int], str],
) -> tuple[Item, list[Skip]]:
    """`read(index)`, or on `ImageError` `read` of the next position (wrapping around), up to `MAX_FALLBACKS` tries.

    So a given index always yields the same item. Positions that failed are added to `bad` (the caller's memory,
    one per process) and not read again; the returned skips name each failed one with its reason.
    """
    skipped: list[Skip] = []
    for offset in range(min(size, MAX_FALLBACKS)):
        position = (index + offset) % size
        if position in bad:
            continue
        try:
            return read(position), skipped
        except ImageError as error:
            bad.add(position)
            skipped.append((name(position), str(error)))
    raise RuntimeError(
        f"no readable image in {min(size, MAX_FALLBACKS)} tries from index {index}; broken source? "
        + "; ".join(reason for _, reason in skipped[:5])
    )


def held_out_split(count: int, held_out: int, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out): `held_out` of the positions 0..count-1 chosen by a permutation seeded by `seed`, not the
    first ones (folders are often sorted by class or by date); each list sorted."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held_out:]), sorted(order[:held_out])
