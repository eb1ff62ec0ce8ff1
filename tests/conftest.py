"""Shared fixtures: the offline assets beside the checkout, and small seeded models."""

import os
from pathlib import Path

import pytest
import torch

SHARED_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    """`../shared/assets` (LPIPS backbones, Kodak, BSDS500); tests needing it skip when it is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"offline assets not found at {SHARED_ASSETS} (CI always has them)")
    return SHARED_ASSETS


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach a hub; pretrained backbones come from the shared folder when it exists."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("VAEGAN_OFFLINE", "1")  # torchvision weights from its cache only, never downloaded
    if "VAEGAN_WEIGHTS_DIR" not in os.environ and (SHARED_ASSETS / "lpips").is_dir():
        monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(SHARED_ASSETS / "lpips"))
    torch.manual_seed(0)
