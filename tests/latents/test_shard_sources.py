"""WebDataset tars and Parquet files as encoding sources, natively: each file one shard, streamed from a bucket
(moto on the loopback interface, through s3fs) by a brace pattern, keys as ids, captions carried along, a
corrupt member and a cut-off tar listed as errors, and latents equal to those of the same photos in a folder."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import datasets
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import vaegan
from vaegan.latents.encode import encode_dataset

from conftest import bsds_photos

pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def photos(assets, tmp_path_factory) -> Path:
    return bsds_photos(assets, tmp_path_factory.mktemp("photos"), "train", 9)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(photos: Path, folder: Path) -> dict[str, str]:
    """Three tars of three samples (jpg, txt, json) from the photos; sample 4's JPEG is corrupt and tar 2 is cut
    in the middle of its second sample's image. Returns {key: photo name} of the samples that can be encoded."""
    folder.mkdir()
    files = sorted(photos.glob("*.jpg"))
    usable = {}
    for number in range(3):
        path = folder / f"shard-{number:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for position in range(3):
                photo = files[3 * number + position]
                key = f"{number:05d}{position:04d}"
                data = photo.read_bytes()
                if (number, position) == (1, 1):
                    data = data[:300]
                else:
                    usable[key] = photo.name
                add(tar, f"{key}.jpg", data)
                add(tar, f"{key}.txt", f"a photo called {photo.stem}".encode())
                add(tar, f"{key}.json", json.dumps({"file": photo.name}).encode())
        if number == 2:
            whole = path.read_bytes()
            cut = whole.index(b"000020001.jpg") + 1500  # past its header, inside the second sample's image
            path.write_bytes(whole[:cut])
            for key in ("000020001", "000020002"):
                usable.pop(key)
    return usable


def upload(folder: Path, url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(folder.iterdir()):
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())


def by_photo(folder: Path) -> dict[str, torch.Tensor]:
    dataset = vaegan.LatentDataset(folder, sample=False)
    return {dataset.ids[index]: dataset[index]["latent"] for index in range(len(dataset))}


def test_webdataset_tars_from_a_bucket_by_brace_pattern(mini_vae, photos, s3, tmp_path, hf_cache):
    usable = write_tars(photos, tmp_path / "tars")
    upload(tmp_path / "tars", f"{s3}/tars")
    out = f"{s3}/latents"
    summary = encode_dataset(mini_vae, f"{s3}/tars/shard-{{00000..00002}}.tar", out, crop=64,
                             keep_columns=("txt", "json"), batch_size=1, num_workers=2, device="cpu",
                             progress=False)
    assert summary.manifest["complete"] and summary.manifest["shards"]["count"] == 3
    assert summary.manifest["source"]["kind"] == "tar" and summary.encoded == len(usable) == 6

    fs = fsspec.filesystem("s3")
    errors = [json.loads(line) for line in fs.cat_file("bucket/latents/errors.jsonl").splitlines()]
    assert [(error["id"], error["shard"]) for error in errors] == [
        ("000010001", 1), (f"{s3}/tars/shard-00002.tar", 2)]
    assert "cannot decode" in errors[0]["reason"] or "not an image" in errors[0]["reason"]
    assert "1 sample was read before it broke" in errors[1]["reason"]

    dataset = vaegan.LatentDataset(out)
    assert sorted(dataset.ids) == sorted(usable) and dataset.kept_columns == ["txt", "json"]
    item = dataset[dataset.ids.index("000000002")]
    assert item["txt"] == f"a photo called {Path(usable['000000002']).stem}"
    assert json.loads(item["json"]) == {"file": usable["000000002"]}
    fs.invalidate_cache()
    plain = datasets.load_dataset("parquet", data_files=f"{out}/train-*.parquet", split="train")
    assert sorted(plain["id"]) == sorted(usable) and set(plain["txt"]) == {
        f"a photo called {Path(name).stem}" for name in usable.values()}

    # The same photos in a folder give the same latents.
    encode_dataset(mini_vae, photos, tmp_path / "folder", crop=64, batch_size=1, num_workers=0, device="cpu",
                   progress=False)
    expected, got = by_photo(tmp_path / "folder"), by_photo(out)
    for key, name in usable.items():
        torch.testing.assert_close(got[key], expected[name], rtol=0, atol=0)

    # A rerun finds every shard done; other kept columns would change the rows, and are refused.
    again = encode_dataset(mini_vae, f"{s3}/tars/shard-{{00000..00002}}.tar", out, crop=64,
                           keep_columns=("txt", "json"), num_workers=0, device="cpu", progress=False)
    assert again.encoded == 0 and again.skipped == 8  # 6 encoded, a corrupt image, a cut-off tar
    with pytest.raises(ValueError, match="source.keep_columns"):
        encode_dataset(mini_vae, f"{s3}/tars/shard-{{00000..00002}}.tar", out, crop=64, keep_columns=("txt",),
                       num_workers=0, device="cpu", progress=False)


def test_parquet_files_of_image_bytes(mini_vae, photos, tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    files = sorted(photos.glob("*.jpg"))
    for number in range(2):
        chosen = files[4 * number:4 * number + 4]
        table = pa.table({
            "image": pa.array([{"bytes": photo.read_bytes(), "path": photo.name} for photo in chosen]),
            "name": [photo.name for photo in chosen],
            "caption": [f"caption of {photo.stem}" for photo in chosen],
        })
        pq.write_table(table, folder / f"part-{number}.parquet")
    out = tmp_path / "latents"
    summary = encode_dataset(mini_vae, f"{folder}/*.parquet", out, crop=64, id_column="name", keep_columns=("caption",),
                             batch_size=1, num_workers=0, device="cpu", progress=False)
    assert summary.manifest["source"]["kind"] == "parquet" and summary.encoded == 8
    shutil.copytree(photos, tmp_path / "some", ignore=lambda _, names: [n for n in names if n not in
                                                                          {p.name for p in files[:8]}])
    encode_dataset(mini_vae, tmp_path / "some", tmp_path / "folder", crop=64, batch_size=1, num_workers=0,
                   device="cpu", progress=False)
    expected, got = by_photo(tmp_path / "folder"), by_photo(out)
    assert got.keys() == expected.keys()
    for name, latent in got.items():
        torch.testing.assert_close(latent, expected[name], rtol=0, atol=0)
    dataset = vaegan.LatentDataset(out)
    assert dataset[0]["caption"] == f"caption of {Path(dataset.ids[0]).stem}"
