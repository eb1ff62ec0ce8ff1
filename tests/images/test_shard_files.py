"""Raw samples from WebDataset tars and Parquet files, on disk and on fsspec's memory file system: brace patterns,
listing, WebDataset's key rules, shards that break off part-way, and both Parquet image column layouts."""

import io
import json
import tarfile
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vaegan.images.reading import ImageError, load_image
from vaegan.images.shard_files import (
    RawSample,
    ShardReadError,
    expand_braces,
    file_fingerprint,
    list_shard_files,
    parquet_samples,
    tar_samples,
)


@pytest.fixture(scope="module")
def photos(assets) -> list[bytes]:
    """Four BSDS500 JPEGs, as stored."""
    return [path.read_bytes() for path in sorted((assets / "bsds500" / "train").glob("*.jpg"))[:4]]


def tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    """A tar of (name, bytes) members in the order given; a name ending in "/" is a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def captioned(photos: list[bytes], count: int) -> list[tuple[str, bytes]]:
    """`count` samples s000, s001...: a photo, a caption and a JSON record each."""
    members = []
    for i in range(count):
        members += [
            (f"s{i:03d}.jpg", photos[i]),
            (f"s{i:03d}.txt", f"photo {i}".encode()),
            (f"s{i:03d}.json", json.dumps({"i": i}).encode()),
        ]
    return members


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


# ----------------------------------------------------------------------------------------------- brace patterns


def test_numeric_ranges_keep_the_first_bounds_padding():
    assert expand_braces("shards/{000..002}.tar") == ["shards/000.tar", "shards/001.tar", "shards/002.tar"]
    assert expand_braces("{098..101}") == ["098", "099", "100", "101"]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("s3://bucket/train-{00000..01023}.tar")[-1] == "s3://bucket/train-01023.tar"
    assert len(expand_braces("{00000..01023}")) == 1024


def test_lists_and_several_groups_expand_as_a_product_in_order():
    assert expand_braces("data/{train,val}.tar") == ["data/train.tar", "data/val.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("{x,}y") == ["xy", "y"]
    assert expand_braces("plain/file.tar") == ["plain/file.tar"]


@pytest.mark.parametrize("pattern", ["s-{5..1}.tar", "s-{1..3.tar", "s-1..3}.tar", "s-{a}.tar", "s-{}.tar",
                                     "s-{a,{b,c}}.tar", "s-{1..3..2}.tar", "s-{a..c}.tar"])
def test_malformed_brace_patterns_are_refused_by_name(pattern):
    with pytest.raises(ValueError, match=f"'{pattern}'".replace("{", r"\{").replace(".", r"\.")):
        expand_braces(pattern)


# ------------------------------------------------------------------------------------------------------ listing


def shard_tree(root: str) -> None:
    """Three top-level tars, one nested, and a file of another kind, written through fsspec."""
    for name in ("train-000.tar", "train-001.tar", "train-002.tar", "more/train-003.tar", "README.md"):
        with fsspec.open(f"{root}/{name}", "wb") as file:
            file.write(name.encode())


@pytest.fixture
def memory_root():
    """A fresh folder on fsspec's process-wide memory file system, removed afterwards."""
    root = f"memory://shard-files-{uuid.uuid4().hex}"
    yield root
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_listing_a_local_folder_pattern_and_glob(tmp_path):
    root = tmp_path / "shards"
    shard_tree(str(root))
    top = [str(root / f"train-{i:03d}.tar") for i in range(3)]
    assert list_shard_files(str(root), ".tar") == sorted([*top, str(root / "more" / "train-003.tar")])
    assert list_shard_files(f"{root}/train-{{000..002}}.tar", ".tar") == top
    assert list_shard_files(f"{root}/*.tar", ".tar") == top
    assert list_shard_files(top[1], ".tar") == [top[1]]
    with pytest.raises(FileNotFoundError, match="train-003.tar does not exist"):
        list_shard_files(f"{root}/train-{{000..004}}.tar", ".tar")
    with pytest.raises(FileNotFoundError, match=f"{root}: no files ending in '.parquet'"):
        list_shard_files(str(root), ".parquet")
    with pytest.raises(FileNotFoundError, match="no files found"):
        list_shard_files(f"{root}/*.parquet", ".parquet")


def test_relative_local_specs_give_plain_absolute_paths(tmp_path, monkeypatch):
    shard_tree(str(tmp_path / "shards"))
    monkeypatch.chdir(tmp_path)
    for spec in ("shards", "shards/*.tar", "shards/train-{000..002}.tar"):
        files = list_shard_files(spec, ".tar")
        assert str(tmp_path / "shards" / "train-000.tar") in files, spec
        assert all(file.startswith(str(tmp_path)) for file in files), spec


def test_listing_on_an_fsspec_file_system_keeps_the_protocol(memory_root):
    shard_tree(memory_root)
    fs, root = fsspec.core.url_to_fs(memory_root)
    prefix = fs.unstrip_protocol(root) + "/"  # the memory file system's own spelling: memory:///name
    top = [f"{prefix}train-{i:03d}.tar" for i in range(3)]
    nested = list_shard_files(memory_root, ".tar")
    assert nested == [f"{prefix}more/train-003.tar", *top]
    assert list_shard_files(f"{memory_root}/train-{{000..002}}.tar", ".tar") == top
    assert list_shard_files(f"{memory_root}/*.tar", ".tar") == top
    for url in nested:
        with fsspec.open(url, "rb") as file:
            assert file.read() == url.removeprefix(prefix).encode()
    with pytest.raises(FileNotFoundError, match="train-003.tar does not exist"):
        list_shard_files(f"{memory_root}/train-{{000..003}}.tar", ".tar")


def test_fingerprint_changes_with_the_file_list_and_sizes(tmp_path):
    urls = [write(tmp_path / f"{i}.tar", b"x" * 10) for i in range(2)]
    before = file_fingerprint(urls)
    assert len(before) == 64 and before == file_fingerprint(list(urls))
    added = write(tmp_path / "2.tar", b"x" * 10)
    assert file_fingerprint([*urls, added]) != before
    Path(urls[1]).write_bytes(b"x" * 11)
    assert file_fingerprint(urls) != before
    Path(urls[1]).write_bytes(b"y" * 10)  # same size again: the fingerprint does not read the bytes
    assert file_fingerprint(urls) == before
    assert file_fingerprint([urls[0], added]) != before  # a renamed file


def test_fingerprint_on_an_fsspec_file_system(memory_root):
    shard_tree(memory_root)
    urls = list_shard_files(memory_root, ".tar")
    before = file_fingerprint(urls)
    with fsspec.open(urls[0], "wb") as file:
        file.write(b"a different size")
    assert file_fingerprint(urls) != before


# --------------------------------------------------------------------------------------------------------- tars


def test_tar_samples_follow_webdatasets_keys(tmp_path, photos):
    members = [
        *captioned(photos, 1),
        ("s001.JPG", photos[1]), ("s001.txt", "caf\xe9".encode()),  # an uppercase extension, a non-ASCII caption
        ("s002.txt", b"a caption without its image"),
        ("a.b/", b""), ("a.b/c.jpg", photos[2]), ("a.b/c.json", b"{}"),  # dots in a folder name are not the key's
        ("s004.mask.png", photos[3]),  # the extension is "mask.png": no image
        ("s005.webp", b"webp bytes"), ("s005.jpg", photos[0]),
    ]
    url = write(tmp_path / "shard.tar", tar_bytes(members))
    samples = list(tar_samples(url, keep=("txt", "json")))
    assert [(sample.index, sample.id) for sample in samples] == [
        (0, "s000"), (1, "s001"), (2, "s002"), (3, "a.b/c"), (4, "s004"), (5, "s005"),
    ]
    first, upper, captioned_only, nested, masked, both = samples
    assert first == RawSample(0, "s000", f"{url}:s000.jpg", photos[0], {"txt": "photo 0", "json": '{"i": 0}'})
    assert upper.data == photos[1] and upper.extras == {"txt": "café"} and upper.name == f"{url}:s001.JPG"
    assert captioned_only.data is None and captioned_only.extras == {"txt": "a caption without its image"}
    assert captioned_only.missing == "no image member (jpg, jpeg, png, webp)"
    assert captioned_only.name == f"{url}:s002"
    assert nested.data == photos[2] and nested.extras == {"json": "{}"} and nested.missing is None
    assert masked.data is None and masked.missing
    assert both.data == photos[0]  # jpg comes before webp in the default order, whatever the members' order


def test_image_extensions_choose_and_order_the_image(tmp_path, photos):
    url = write(tmp_path / "shard.tar", tar_bytes([("k.jpg", photos[0]), ("k.png", photos[1]), ("k.cls", b"7")]))
    [png] = tar_samples(url, image_extensions=("png", "jpg"), keep=("cls",))
    assert png.data == photos[1] and png.extras == {"cls": "7"} and png.name == f"{url}:k.png"
    [none] = tar_samples(url, image_extensions=("webp",))
    assert none.data is None and none.missing == "no image member (webp)" and none.extras == {}


def test_compressed_tars_on_an_fsspec_file_system(memory_root, photos):
    url = f"{memory_root}/shard.tar.gz"
    with fsspec.open(url, "wb") as file:
        file.write(tar_bytes(captioned(photos, 3), mode="w:gz"))
    samples = list(tar_samples(url, keep=("txt",)))
    assert [sample.data for sample in samples] == photos[:3]
    assert [sample.extras["txt"] for sample in samples] == ["photo 0", "photo 1", "photo 2"]


def break_points(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Ways for a tar of captioned samples to break inside its third sample, after its first header was read:
    (offset, replacement tail)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        image, caption, _ = [info for info in tar.getmembers() if info.name.startswith("s002")]
    return {
        "mid image": (image.offset_data + image.size // 2, b""),
        "at a header": (caption.offset, b""),  # tarfile alone would end here quietly, one sample short
        "mid header": (caption.offset + 100, b""),
        "mid caption": (caption.offset_data + 3, b""),
        "corrupt header": (caption.offset, b"\xff" * 512 + data[caption.offset + 512:]),
    }


@pytest.mark.parametrize("where", ["mid image", "at a header", "mid header", "mid caption", "corrupt header"])
def test_a_broken_tar_yields_its_complete_samples_then_fails(tmp_path, photos, where):
    data = tar_bytes(captioned(photos, 4))
    offset, tail = break_points(data)[where]
    url = write(tmp_path / "broken.tar", data[:offset] + tail)
    read = []
    with pytest.raises(ShardReadError) as caught:
        for sample in tar_samples(url, keep=("txt", "json")):
            read.append(sample)
    assert [sample.id for sample in read] == ["s000", "s001"]
    assert [sample.data for sample in read] == photos[:2]
    assert [sample.extras["json"] for sample in read] == ['{"i": 0}', '{"i": 1}']
    assert str(caught.value).startswith(f"{url}: ") and "2 samples were read" in str(caught.value)


def test_a_break_at_a_samples_first_header_drops_the_sample_before_it(tmp_path, photos):
    """Members after the break could have belonged to the sample before it, so that one is not known complete."""
    data = tar_bytes(captioned(photos, 4))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = tar.getmember("s002.jpg")
    url = write(tmp_path / "broken.tar", data[:third.offset])
    read = []
    with pytest.raises(ShardReadError, match="1 sample was read"):
        for sample in tar_samples(url):
            read.append(sample.id)
    assert read == ["s000"]


def test_a_truncated_compressed_tar_fails_after_its_complete_samples(tmp_path, photos):
    data = tar_bytes(captioned(photos, 4), mode="w:gz")
    url = write(tmp_path / "broken.tar.gz", data[: len(data) * 5 // 8])  # within the third photo
    read = []
    with pytest.raises(ShardReadError, match="2 samples were read"):
        for sample in tar_samples(url):
            read.append(sample.id)
    assert read == ["s000", "s001"]


@pytest.mark.parametrize("data", [b"", b"not a tar at all" * 100])
def test_a_file_that_is_no_tar_fails_with_no_samples(tmp_path, data):
    url = write(tmp_path / "shard.tar", data)
    with pytest.raises(ShardReadError, match="0 samples were read"):
        list(tar_samples(url))


def test_a_missing_tar_is_not_a_broken_one(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(tar_samples(str(tmp_path / "absent.tar")))


def test_a_corrupt_image_is_a_sample_that_fails_to_decode(tmp_path, photos):
    members = [("good.jpg", photos[0]), ("corrupt.jpg", photos[1][:300])]
    url = write(tmp_path / "shard.tar", tar_bytes(members))
    good, corrupt = tar_samples(url)
    assert corrupt.data == photos[1][:300] and corrupt.missing is None
    assert sorted(load_image(good.data, name=good.name).size) == [321, 481]  # BSDS500's photo size
    with pytest.raises(ImageError, match=f"{url}:corrupt.jpg"):
        load_image(corrupt.data, name=corrupt.name)


# ------------------------------------------------------------------------------------------------------ Parquet

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the Hugging Face `Image` feature


def write_parquet(path: Path, columns: dict[str, pa.Array], row_group_size: int = 2) -> str:
    # Without dictionary pages, a column chunk starts with the page header that the broken-file test overwrites.
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size, use_dictionary=False)
    return str(path)


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()])
def test_parquet_binary_images_with_ids_and_kept_columns(tmp_path, photos, kind):
    url = write_parquet(tmp_path / "part-00000.parquet", {
        "image": pa.array([photos[0], None, photos[1]], kind),
        "key": pa.array([10, 11, 12]),
        "caption": pa.array(["a photo", None, "another"]),
        "tags": pa.array([["a", "b"], [], ["é"]]),
        "score": pa.array([0.5, 1.0, 2.25]),
    })
    samples = list(parquet_samples(url, id_column="key", keep=("caption", "tags", "score"), batch_size=2))
    assert samples[0] == RawSample(
        0, "10", f"{url}[0]", photos[0], {"caption": "a photo", "tags": '["a", "b"]', "score": "0.5"}
    )
    assert samples[1] == RawSample(1, "11", f"{url}[1]", None, {"tags": "[]", "score": "1.0"}, "null image")
    assert samples[2].data == photos[1] and samples[2].extras["tags"] == '["é"]' and samples[2].index == 2
    assert [sample.id for sample in parquet_samples(url)] == ["part-00000/0", "part-00000/1", "part-00000/2"]


def test_parquet_hugging_face_image_structs(memory_root, photos):
    images = pa.array([
        {"bytes": photos[0], "path": "0.jpg"}, None, {"bytes": None, "path": "elsewhere/2.jpg"},
        {"bytes": photos[2], "path": None},
    ], IMAGE_STRUCT)
    url = f"{memory_root}/train.parquet"
    with fsspec.open(url, "wb") as file:
        pq.write_table(pa.table({"jpg": images, "id": ["a", "b", "c", "d"]}), file, row_group_size=3)
    samples = list(parquet_samples(url, image_column="jpg", id_column="id", batch_size=3))
    assert [sample.id for sample in samples] == ["a", "b", "c", "d"]
    assert [sample.data for sample in samples] == [photos[0], None, None, photos[2]]
    assert [sample.missing for sample in samples] == [
        None, "null image", "image not embedded, only its path: elsewhere/2.jpg", None,
    ]


def test_parquet_columns_that_are_missing_or_not_images_are_named(tmp_path, photos):
    url = write_parquet(tmp_path / "part.parquet", {"image": pa.array([photos[0]]), "text": ["a"]})
    for arguments, column in [({"image_column": "jpg"}, "jpg"), ({"id_column": "key"}, "key"),
                              ({"keep": ("text", "caption")}, "caption")]:
        with pytest.raises(ValueError, match=f"{url}: no column '{column}'; its columns are image, text"):
            list(parquet_samples(url, **arguments))
    with pytest.raises(ValueError, match="column 'text' is string, not image bytes"):
        list(parquet_samples(url, image_column="text"))
    nameless = write_parquet(tmp_path / "nameless.parquet", {"image": pa.array([photos[0]] * 2), "key": ["a", None]})
    with pytest.raises(ValueError, match=rf"{nameless}\[1\]: null id in column 'key'"):
        list(parquet_samples(nameless, id_column="key"))


def test_a_broken_parquet_file_fails_after_the_rows_it_could_read(tmp_path, photos):
    path = tmp_path / "part.parquet"
    write_parquet(path, {"image": pa.array(photos, pa.binary())})
    second_group = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[second_group:second_group + 16] = b"\xff" * 16  # the page header of the second row group
    path.write_bytes(bytes(data))
    read = []
    with pytest.raises(ShardReadError, match="2 samples were read"):
        for sample in parquet_samples(str(path), batch_size=2):
            read.append(sample.data)
    assert read == photos[:2]
    cut = write(tmp_path / "cut.parquet", bytes(data[: len(data) // 2]))
    with pytest.raises(ShardReadError, match=f"{cut}: cannot read the Parquet file .*0 samples were read"):
        list(parquet_samples(cut))
