"""The README's Python examples run as written, with only paths and the device swapped for local ones."""

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.data import astronaut

import vaegan

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_codec_example_runs(tmp_path, monkeypatch):
    (example,) = [block for block in python_blocks() if 'vaegan.load("out/sd-vae")' in block]
    vaegan.save(vaegan.AutoencoderKL(vaegan.preset("mini")), tmp_path / "out" / "sd-vae")
    Image.fromarray(astronaut()[:128, :128]).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(example.replace('device="cuda"', 'device="cpu"'), namespace)
    assert namespace["latents"].shape == (1, 4, 32, 32)  # the tiny VAE is f4
    assert namespace["image"].size == (128, 128)


def test_latent_dataset_example_runs(tmp_path, monkeypatch):
    (example,) = [block for block in python_blocks() if "vaegan.LatentDataset(" in block]
    vae = vaegan.AutoencoderKL(vaegan.preset("mini"))
    vaegan.save(vae, tmp_path / "vae")
    images = tmp_path / "images"
    images.mkdir()
    photo = astronaut()
    for i in range(6):
        Image.fromarray(np.ascontiguousarray(photo[i * 32:i * 32 + 96, i * 16:i * 16 + 128])).save(images / f"{i}.png")
    from vaegan.latents.encode import encode_dataset

    encode_dataset(tmp_path / "vae", images, tmp_path / "latents", crop=64, batch_size=4, progress=False)
    code = (example.replace('"/data/latents"', repr(str(tmp_path / "latents")))
            .replace("dataset.batch_sampler(64,", "dataset.batch_sampler(4,").replace("num_workers=4", "num_workers=0")
            .replace("range(epochs)", "range(2)"))
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["x"].shape[1:] == (4, 16, 16) and namespace["x"].dtype == torch.float32


def test_flux2_example_runs_from_the_hub_cache(tmp_path, monkeypatch):
    (example,) = [block for block in python_blocks() if "FLUX.2-dev" in block]
    # A FLUX.2-shaped VAE (narrow, random) where the hub cache keeps black-forest-labs/FLUX.2-dev's vae/.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    storage = tmp_path / "hf" / "hub" / "models--black-forest-labs--FLUX.2-dev"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text("0" * 40)
    tiny = vaegan.preset("flux2", block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1)
    vaegan.save(vaegan.AutoencoderKL(tiny), storage / "snapshots" / ("0" * 40) / "vae")
    namespace: dict = {"vaegan": vaegan, "image": Image.fromarray(astronaut()[:64, :64])}
    exec(example, namespace)
    assert namespace["latents"].shape == (1, 128, 4, 4)  # 64 px: 8x8 latents of 32 channels, in 2x2 patches
