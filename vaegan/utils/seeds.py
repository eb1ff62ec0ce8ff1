"""Seeds derived from what is drawn, not from what was drawn before.

Training draws its random numbers (crops, flips, the data order, posterior samples, anything a regulariser
adds) from generators seeded by keys such as (seed, epoch, sample) or (seed, batch, purpose). Such a draw gives
the same numbers in a run that started at batch 0 and in one resumed at batch 40, however many data workers
read and whatever else used torch's global generator in between: which is what makes a resumed run continue
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends on every key and their order, the same in every process and Python version
    (unlike `hash`, which Python salts per process)."""
    digest = hashlib.blake2b(repr(tuple(keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(*keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device`, seeded by `derived_seed(*keys)`."""
    return torch.Generator(device=device).manual_seed(derived_seed(*keys))
