"""FLUX.2 end to end: fine-tune a FLUX.2-shaped VAE, export it with its patch statistics measured on the
training images, run the export in diffusers' Flux2Pipeline, encode a dataset with it and decode it back."""

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import vaegan
from vaegan.autoencoder.normalization import LatentNormalization, patchify
from vaegan.images.crops import resize_center_crop
from vaegan.images.reading import load_image, to_tensor
from vaegan.latents.decode import decode_latents
from vaegan.latents.encode import encode_dataset
from vaegan.train.data import ImageDataModule
from vaegan.train.export import export
from vaegan.train.module import VAEGAN

from conftest import bsds_photos, read_rows

diffusers = pytest.importorskip("diffusers")

TINY_F8 = {"block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8, "layers_per_block": 1}
SIZE = 32  # pixels: 4x4 latents, 2x2 patches


def tiny_flux2_pipeline(vae_folder) -> "diffusers.Flux2Pipeline":
    transformer = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * 32, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
    )
    return diffusers.Flux2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(vae_folder).eval(), transformer=transformer,
    )


def crops(folder) -> tuple[list[str], torch.Tensor]:
    """The training photos as the export and `vaegan encode --crop` see them: (N, 3, SIZE, SIZE) in [-1, 1]."""
    paths = sorted(folder.glob("*.jpg"))
    images = [to_tensor(resize_center_crop(load_image(path), SIZE)[0]) for path in paths]
    return [path.name for path in paths], torch.stack(images)


@pytest.fixture(scope="module")
def exported(assets, tmp_path_factory):
    """A FLUX.2-shaped VAE fine-tuned for a few batches on BSDS500 photos and exported: (vae folder, photos)."""
    root = tmp_path_factory.mktemp("flux2")
    torch.manual_seed(0)
    start = vaegan.save(vaegan.AutoencoderKL(vaegan.preset("flux2", **TINY_F8)), root / "start")
    photos = bsds_photos(assets, root, "train", 4)
    L.seed_everything(0)
    data = ImageDataModule(source=str(photos), val_source=str(photos), resolution=SIZE, batch_size=2,
                           num_workers=0, min_size=SIZE)
    # (A module-scoped fixture runs before conftest's per-test environment: name the LPIPS weights file.)
    module = VAEGAN(init_from=str(start), perceptual_net="squeeze",
                    perceptual_weights_file=str(assets / "lpips" / "squeezenet1_1_features.safetensors"),
                    disc_start=2, disc_channels=16, disc_layers=2, grid_images=2, max_batches=4)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, callbacks=[checkpoints],
              limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False).fit(module, data)
    # No --data: the export measures on the images the checkpoint was trained on.
    folder = export(str(root / "checkpoints" / "last.ckpt"), str(root / "vae"), resolution=SIZE)
    return folder, photos


@pytest.mark.slow
def test_export_measures_flux2s_patch_statistics_on_the_training_images(exported):
    folder, photos = exported
    vae = vaegan.load(folder)
    normalization = LatentNormalization.of(vae)
    assert normalization.kind == "patch" and "Flux2Pipeline" in (folder / "README.md").read_text()
    # An independent measurement: every training photo's 2x2 patches, per channel, in float64.
    with torch.no_grad():
        patches = patchify(vae.encode(crops(photos)[1]).mode(), (2, 2)).double()
    values = patches.transpose(0, 1).flatten(1)                              # (128, N * h/2 * w/2)
    torch.testing.assert_close(vae.bn.running_mean.double(), values.mean(1), rtol=0, atol=2e-5)
    torch.testing.assert_close(vae.bn.running_var.double(), values.var(1), rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_exported_vae_runs_in_flux2_pipeline(exported):
    folder, _ = exported
    ours = vaegan.load(folder)
    pipe = tiny_flux2_pipeline(folder)
    seen: list[torch.Tensor] = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *args, **kwargs: seen.append(z.detach().clone()) or decode(z, *args, **kwargs)
    kept: list[torch.Tensor] = []

    def keep(pipe, step, timestep, tensors):
        kept.append(tensors["latents"])
        return {}

    images = pipe(prompt_embeds=torch.randn(1, 8, 32), height=SIZE, width=SIZE, num_inference_steps=2,
                  output_type="np", generator=torch.Generator().manual_seed(0), callback_on_step_end=keep).images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()
    # What the pipeline decoded is the last latents (tokens of 2x2 patches) denormalised as vaegan does.
    tokens = kept[-1].reshape(1, SIZE // 16, SIZE // 16, 128).permute(0, 3, 1, 2)
    torch.testing.assert_close(seen[0], LatentNormalization.of(ours).denormalize(tokens), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_encoded_shards_are_flux2_pipelines_latents_and_decode_back(exported, tmp_path):
    folder, photos = exported
    out = tmp_path / "latents"
    encode_dataset(folder, photos, out, crop=SIZE, store="mean", num_workers=0, device="cpu", progress=False)
    rows = {row["id"]: row for row in read_rows(out)}
    names, images = crops(photos)
    pipe = tiny_flux2_pipeline(folder)
    with torch.no_grad():
        expected = pipe._encode_vae_image(images, generator=None)              # (N, 128, SIZE/16, SIZE/16)
    stored = torch.stack([torch.from_numpy(rows[name]["latent"]) for name in names])
    assert stored.shape == expected.shape
    torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)         # fp16 storage

    decoded = decode_latents(input=str(out), output=str(tmp_path / "images"), device="cpu", progress=False)
    assert sorted(path.stem for path in decoded) == sorted(name.removesuffix(".jpg") for name in names)
    codec = vaegan.Codec(vaegan.load(folder))
    for path in decoded:
        again = codec.decode(torch.from_numpy(rows[f"{path.stem}.jpg"]["latent"]), output="numpy")[0]
        assert np.abs(np.asarray(Image.open(path)).astype(int) - again).max() <= 1
