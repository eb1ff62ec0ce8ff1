"""The frozen vision model that latents are aligned to: offline weights, feature grids, kept out of checkpoints."""

import importlib.util

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vaegan.pretrained.vision import DINOV2_MODELS, VisionFeatures


def test_alexnet_features_from_the_weights_folder(assets):
    vision = VisionFeatures("alexnet")  # conftest points VAEGAN_WEIGHTS_DIR at the shared folder
    assert vision.source.endswith("alexnet_features.safetensors") and vision.dim == 256
    features = vision(torch.rand(2, 3, 64, 48) * 2 - 1)  # any input size: resized to 224 first
    assert features.shape == (2, 256, 13, 13) and features.std() > 0
    nn.ModuleDict({"vision": vision}).train()  # a parent switching to training mode
    assert not any(module.training for module in vision.modules())
    assert all(not p.requires_grad for p in vision.parameters())


def test_the_backbone_stays_out_of_state_dicts_and_loads_back_strictly(assets):
    parent = nn.Module()
    parent.vision = VisionFeatures("squeezenet1_1", image_size=96)
    parent.head = nn.Conv2d(4, parent.vision.dim, 1)
    state = parent.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    before = parent.vision.network[0].weight.clone()
    parent.load_state_dict(state, strict=True)  # the missing backbone keys are its own, put back
    assert torch.equal(parent.vision.network[0].weight, before)


def test_a_missing_backbone_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(RuntimeError, match="vgg16_features.safetensors.*VAEGAN_WEIGHTS_DIR"):
        VisionFeatures("vgg16")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        VisionFeatures("alexnet", weights=tmp_path / "nowhere.safetensors")
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ImportError, match="pip install timm"):
            VisionFeatures("dinov2_vits14")
    else:
        with pytest.raises(RuntimeError, match="dinov2_vits14.safetensors.*VAEGAN_OFFLINE forbids"):
            VisionFeatures("dinov2_vits14")


def test_dinov2_patch_tokens_on_a_grid(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    # Random weights in the file format the docs ask for (timm's state dict): the real ones are not offline.
    network = timm.create_model(DINOV2_MODELS["dinov2_vits14"], pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, tmp_path / "dinov2_vits14.safetensors")
    monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(tmp_path))
    vision = VisionFeatures("dinov2_vits14")
    assert vision.dim == 384 and vision(torch.rand(1, 3, 64, 64) * 2 - 1).shape == (1, 384, 16, 16)
