"""LatentDataset and its bucket sampler, for a diffusion trainer; decoding a sampler's latents to images."""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaegan
from vaegan.cli import main
from vaegan.latents.dataset import BucketBatchSampler, LatentDataset
from vaegan.latents.decode import decode_latents
from vaegan.latents.encode import encode_dataset

from conftest import read_rows, skimage_photos


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny VAE and a posterior encoding of 12 photos in aspect-ratio buckets."""
    root = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    vae = vaegan.AutoencoderKL(vaegan.preset("mini", scaling_factor=0.5, shift_factor=0.1))
    model = vaegan.save(vae, root / "vae", format="diffusers")
    images = skimage_photos(root / "images", 12)
    encode_dataset(model, images, root / "out", buckets=48, step=16, shard_size=5, batch_size=4, num_workers=0,
                   device="cpu", progress=False)
    return model, root / "out"


def test_items_are_the_stored_mean_or_a_sample_around_it(encoded):
    _, out = encoded
    stored = {row["id"]: row for row in read_rows(out)}
    means = LatentDataset(out, sample=False)
    samples = LatentDataset(out)  # a posterior was stored: sampling is the default
    assert samples.sample and len(means) == len(samples) == 12
    torch.manual_seed(0)
    deviations = []
    for i in range(len(means)):
        item = means[i]
        row = stored[item["id"]]
        np.testing.assert_array_equal(item["latent"].numpy(), row["mean"])
        assert item["original_size"].tolist() == [row["source_height"], row["source_width"]]
        drawn = samples[i]["latent"]
        deviations.append(((drawn - item["latent"]) / torch.from_numpy(row["logvar"]).mul(0.5).exp()).flatten())
    noise = torch.cat(deviations)  # (sample - mean) / std must be standard normal
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    in_memory = LatentDataset(out, sample=False, in_memory=True)
    assert torch.equal(in_memory[7]["latent"], means[7]["latent"])


def test_batches_keep_buckets_together_and_cover_each_item_once(encoded):
    _, out = encoded
    dataset = LatentDataset(out, sample=False)
    assert len(np.unique(dataset.shapes, axis=0)) >= 2  # the photos have different aspect ratios
    sampler = dataset.batch_sampler(3, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    seen = Counter()
    for batch in loader:
        assert batch["latent"].ndim == 4 and batch["latent"].shape[0] <= 3  # stacking worked: one shape
        seen.update(batch["id"])
    assert seen == Counter(dataset.ids) and len(sampler) == len(list(sampler))
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(map(sorted, first)) != sorted(map(sorted, list(sampler)))

    ranks = [BucketBatchSampler(dataset.shapes, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    batches = [list(rank) for rank in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0])
    assert not {i for b in batches[0] for i in b} & {i for b in batches[1] for i in b}


def test_sampling_needs_a_stored_posterior(encoded, tmp_path):
    model, _ = encoded
    images = skimage_photos(tmp_path / "images", 2)
    encode_dataset(model, images, tmp_path / "means", crop=32, store="mean", num_workers=0, device="cpu",
                   progress=False)
    assert not LatentDataset(tmp_path / "means").sample
    with pytest.raises(ValueError, match="store='mean'"):
        LatentDataset(tmp_path / "means", sample=True)


def test_decode_a_samplers_latents_and_a_single_shard(encoded, tmp_path):
    model, out = encoded
    codec = vaegan.Codec(vaegan.load(model))
    latents = torch.randn(3, 4, 8, 12)
    torch.save(latents, tmp_path / "samples.pt")
    paths = decode_latents(input=tmp_path / "samples.pt", output=tmp_path / "images", model=model, format="webp",
                           quality=100, device="cpu", progress=False)
    assert [path.name for path in paths] == ["samples-00000.webp", "samples-00001.webp", "samples-00002.webp"]
    expected = codec.decode(latents, output="numpy")
    decoded = np.stack([np.asarray(Image.open(path)) for path in paths])
    assert decoded.shape == (3, 32, 48, 3) and np.array_equal(decoded, expected)  # quality 100: lossless webp

    shard = sorted(out.glob("train-*.parquet"))[0]
    paths = decode_latents(input=shard, output=tmp_path / "one", model=model, format="jpeg", limit=2, device="cpu",
                           progress=False)
    assert len(paths) == 2 and all(path.suffix == ".jpg" for path in paths)
    with pytest.raises(ValueError, match="give the VAE with --model"):
        decode_latents(input=tmp_path / "samples.pt", output=tmp_path / "images", progress=False)


def test_latents_that_are_not_finite_are_refused_with_their_count(encoded, tmp_path, capsys):
    model, _ = encoded
    latents = torch.randn(2, 4, 8, 8)
    latents[1, :, :2, :3] = float("nan")  # a sampler that diverged on its second image
    latents[1, 0, 7, 7] = float("inf")
    torch.save(latents, tmp_path / "samples.pt")
    with pytest.raises(SystemExit) as exited:
        main(["decode", "--input", str(tmp_path / "samples.pt"), "--output", str(tmp_path / "images"),
              "--model", str(model), "--device", "cpu"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error == (f"vaegan decode: error: {tmp_path / 'samples.pt'}, latent samples-00001: 25 of 256 latent values "
                     "are not finite (NaN or inf), so the images would be black or garbage; --allow_nonfinite true "
                     "decodes them anyway\n")
    assert not (tmp_path / "images").exists()  # refused before anything was written

    codec = vaegan.Codec(vaegan.load(model))
    with pytest.raises(ValueError, match="25 of 512 latent values are not finite"):
        codec.decode(latents)
    assert torch.isfinite(codec.decode(latents[:1])).all()
    paths = decode_latents(input=tmp_path / "samples.pt", output=tmp_path / "images", model=model, device="cpu",
                           allow_nonfinite=True, progress=False)
    assert len(paths) == 2


def test_decoding_with_another_vae_warns(encoded, tmp_path):
    _, out = encoded
    torch.manual_seed(1)  # other weights than the encoder's (seed 0)
    other = vaegan.AutoencoderKL(vaegan.preset("mini", scaling_factor=0.5, shift_factor=0.1))
    path = vaegan.save(other, tmp_path / "other", format="diffusers")
    with pytest.warns(UserWarning, match="not the VAE that encoded it"):
        written = decode_latents(input=out, output=tmp_path / "decoded", model=path, ids=["part0/photo00.png"],
                                 device="cpu", progress=False)
    assert [p.relative_to(tmp_path / "decoded").as_posix() for p in written] == ["part0/photo00.png"]
    assert math.isfinite(np.asarray(Image.open(written[0])).mean())


def lru_misses(batches: list[list[int]], groups: np.ndarray, capacity: int) -> int:
    """Row-group decodes of a reader that keeps the last `capacity` groups, as `LatentDataset` does."""
    cache: list[int] = []
    misses = 0
    for item in (item for batch in batches for item in batch):
        group = int(groups[item])
        if group in cache:
            cache.remove(group)
        else:
            misses += 1
            cache = cache[-(capacity - 1):]
        cache.append(group)
    return misses


def test_windowed_shuffle_covers_every_item_once_and_decodes_each_group_about_once():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 64)                                  # 40 row groups of 64 items
    shapes = np.where(rng.random(len(groups)) < 0.7, 32, 24)[:, None].repeat(3, axis=1)   # two buckets
    windowed = BucketBatchSampler(shapes, 32, seed=1, groups=groups, shuffle_window=8)
    full = BucketBatchSampler(shapes, 32, seed=1, groups=groups, shuffle_window=None)
    epochs = []
    for epoch in range(2):
        windowed.set_epoch(epoch)
        batches = list(windowed)
        epochs.append(batches)
        items = [item for batch in batches for item in batch]
        assert sorted(items) == list(range(len(groups))) and len(batches) == len(windowed)
        assert all(len({tuple(shapes[i]) for i in batch}) == 1 for batch in batches)
        # A window's batches mix its 8 groups (a bucket's remainder from the window before aside)...
        assert np.mean([len({int(groups[i]) for i in batch}) for batch in batches]) > 5
        # ...and each group is decoded about once, against once per item for a full shuffle.
        assert lru_misses(batches, groups, capacity=16) < 60  # 40 groups
    assert lru_misses(list(full), groups, capacity=16) > 1000
    assert epochs[0] != epochs[1]
