"""Where training and evaluation images come from: an image folder, a Hugging Face `datasets` source or the
photos bundled with scikit-image, as random access by index, plus the crops applied to them.

Nothing here needs Lightning, so `vaegan eval` and `vaegan encode` start without importing it; the training
data module (`vaegan.train.data`) builds on these readers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from vaegan.images.crops import check_size, random_crop, resize_center_crop
from vaegan.images.reading import IMAGE_EXTENSIONS, ImageError, encoded_bytes, load_image, to_tensor

# `prefix:PATH` sources go to the `datasets` builder of that name: PATH a directory (data_dir) or files/globs.
BUILDER_PREFIXES = ("imagefolder", "webdataset", "parquet", "arrow")


# The demo set: real photos bundled with scikit-image (public domain / CC0), no network needed. Two photos are
# held out whole for validation, so validation never sees a crop of a training photo.
DEMO_TRAIN_PHOTOS = (
    "astronaut", "rocket", "hubble_deep_field", "motorcycle", "retina", "immunohistochemistry", "camera",
)
DEMO_VAL_PHOTOS = ("chelsea", "coffee")
# Seven photos make a seven-sample epoch; each photo yields this many random crops per epoch instead.
DEMO_CROPS_PER_PHOTO = 32


Skip = tuple[str, str]  # (file or row name, reason)


class ImageReader(Protocol):
    """Random access to the images of one source.

    `name` is for people (error messages, skip reports); `id` is the item's stable identity within the source
    (what encoded latents and evaluation rows are keyed by); `kind` and `fingerprint` say what was listed, so that
    a resumed encoding can tell whether the listing changed.
    """

    kind: str

    def __len__(self) -> int: ...
    def read(self, index: int) -> Image.Image: ...  # RGB; raises ImageError
    # The file as stored (to decode elsewhere) and its name as `read` reports it; None when there is no file.
    def encoded(self, index: int) -> tuple[bytes, str] | None: ...
    def name(self, index: int) -> str: ...
    def id(self, index: int) -> str: ...
    def fingerprint(self) -> str: ...


class FolderImages:
    """Image files under a folder, in a fixed order; an item's id is its path relative to the folder."""

    kind = "folder"

    def __init__(self, root: Path, paths: list[Path]):
        self.root, self.paths = root, paths

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> Image.Image:
        return load_image(self.paths[index])

    def encoded(self, index: int) -> tuple[bytes, str] | None:
        data = encoded_bytes(self.paths[index])
        return None if data is None else (data, str(self.paths[index]))

    def name(self, index: int) -> str:
        return str(self.paths[index])

    def id(self, index: int) -> str:
        return self.paths[index].relative_to(self.root).as_posix()

    def fingerprint(self) -> str:
        """Changes when a file is added, removed or renamed: any of those would shift items between shards."""
        return ids_fingerprint(self)


class UrlFolderImages:
    """Image files under a folder of any fsspec filesystem (`s3://`, `gs://`, `hf://`, `file://`), read whole file
    by file. Ids are paths relative to the folder, as for `FolderImages`, so a folder copied to a bucket keeps
    its ids and its fingerprint."""

    kind = "folder"

    def __init__(self, url: str):
        import fsspec  # imported here: local folders do not need it

        self.url = url.rstrip("/")
        fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")
        found = fs.find(self.root) if fs.isdir(self.root) else []
        self.paths = sorted(path for path in found if Path(path).suffix.lower() in IMAGE_EXTENSIONS)
        self._filesystem, self._pid = fs, os.getpid()

    @property
    def fs(self) -> Any:
        """This process's filesystem object: the asynchronous ones (s3, gcs, http) do not survive a fork into a
        DataLoader worker, so each process makes its own (fsspec's instance cache is per process)."""
        if self._pid != os.getpid():
            import fsspec

            self._filesystem, self._pid = fsspec.core.url_to_fs(self.url)[0], os.getpid()
        return self._filesystem

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> Image.Image:
        return load_image(self._bytes(index), name=self.name(index))

    def encoded(self, index: int) -> tuple[bytes, str] | None:
        return self._bytes(index), self.name(index)

    def _bytes(self, index: int) -> bytes:
        try:
            return self.fs.cat_file(self.paths[index])
        except FileNotFoundError as error:
            raise ImageError(f"{self.name(index)}: gone since the folder was listed") from error

    def name(self, index: int) -> str:
        return f"{self.url}/{self.id(index)}"

    def id(self, index: int) -> str:
        return self.paths[index].removeprefix(self.root + "/")

    def fingerprint(self) -> str:
        """As `FolderImages.fingerprint`: the list of ids."""
        return ids_fingerprint(self)


def ids_fingerprint(reader: ImageReader) -> str:
    """sha256 of a reader's ids in order: the same for a folder and its copy in a bucket."""
    return hashlib.sha256("\n".join(reader.id(i) for i in range(len(reader))).encode()).hexdigest()


def is_url(spec: str) -> bool:
    """A location with a protocol (`s3://...`), read through fsspec rather than as a local path."""
    return "://" in spec


class ArrayImages:
    """Images held in memory as uint8 arrays (the demo photos)."""

    kind = "arrays"

    def __init__(self, names: list[str], arrays: list[np.ndarray]):
        self.names, self.arrays = names, arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def read(self, index: int) -> Image.Image:
        return load_image(Image.fromarray(self.arrays[index]), name=self.names[index])

    def encoded(self, index: int) -> tuple[bytes, str] | None:
        return None

    def name(self, index: int) -> str:
        return self.names[index]

    def id(self, index: int) -> str:
        return self.names[index]

    def fingerprint(self) -> str:
        return ",".join(self.names)


class HubImages:
    """One image column of a map-style `datasets.Dataset`, decoded by `load_image` rather than `datasets`.

    An item's id is the value of `id_column` when given, else its row index; its name is the row's file path
    when it has one (imagefolder rows do), else `label[index]`.
    """

    kind = "dataset"

    def __init__(self, dataset: Any, column: str, label: str, id_column: str | None = None):
        self.dataset, self.column, self.label, self.id_column = dataset, column, label, id_column

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> Image.Image:
        value = self.dataset[index][self.column]
        return load_image(value, name=row_name(value, f"{self.label}[{index}]"))

    def encoded(self, index: int) -> tuple[bytes, str] | None:
        value = self.dataset[index][self.column]
        data = encoded_bytes(value)
        return None if data is None else (data, row_name(value, f"{self.label}[{index}]"))

    def name(self, index: int) -> str:
        return row_name(self.dataset[index][self.column], f"{self.label}[{index}]")

    def id(self, index: int) -> str:
        return str(self.dataset[index][self.id_column]) if self.id_column else str(index)

    def fingerprint(self) -> str:
        return f"{len(self)} rows"


class ReaderSubset:
    """Some indices of an `ImageReader`, itself an `ImageReader`."""

    def __init__(self, reader: ImageReader, indices: Any):
        self.reader, self.indices = reader, list(indices)
        self.kind = reader.kind

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, index: int) -> Image.Image:
        return self.reader.read(self.indices[index])

    def encoded(self, index: int) -> tuple[bytes, str] | None:
        return self.reader.encoded(self.indices[index])

    def name(self, index: int) -> str:
        return self.reader.name(self.indices[index])

    def id(self, index: int) -> str:
        return self.reader.id(self.indices[index])

    def fingerprint(self) -> str:
        return f"{self.reader.fingerprint()}[{len(self)} of them]"


class TrainCrop:
    """Random native-resolution crop (upscaled when the image is smaller) and optional flip, as a tensor; drawn
    from `generator` when given, else from torch's global generator."""

    def __init__(self, resolution: int, flip: bool):
        self.resolution, self.flip = resolution, flip

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        crop, _, _ = random_crop(image, self.resolution, flip=self.flip, generator=generator)
        return to_tensor(crop)  # (3, R, R) in [-1, 1]


class EvalCrop:
    """The deterministic evaluation protocol: shorter side resized to the resolution, centre crop."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """`generator` is accepted so that both crops are called alike, and unused: nothing here is random."""
        crop, _ = resize_center_crop(image, self.resolution)
        return to_tensor(crop)  # (3, R, R) in [-1, 1]


def row_name(value: Any, fallback: str) -> str:
    """A `datasets` row's file path when it has one (imagefolder rows do), else `source[index]`."""
    return str(value["path"]) if isinstance(value, dict) and value.get("path") else fallback


def list_image_files(root: Path) -> list[Path]:
    """Files with an image extension under `root`, recursively, in a stable (sorted) order."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        found += [Path(directory) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def scan_image_files(paths: list[Path], min_size: int) -> tuple[list[Path], list[Skip]]:
    """Read only each file's header: keep the ones that open with a large enough size, report the rest."""
    good: list[Path] = []
    skipped: list[Skip] = []
    for path in paths:
        try:
            if path.stat().st_size == 0:
                raise ImageError(f"{path}: zero-byte file")
            with Image.open(path) as image:  # lazy: reads the header, not the pixels
                size = image.size
            check_size(size, min_size, str(path))
            good.append(path)
        except ImageError as error:
            skipped.append((str(path), str(error)))
        except Exception as error:  # UnidentifiedImageError, permission errors...: the file is unusable
            skipped.append((str(path), f"{path}: cannot open ({type(error).__name__}: {error})"))
    return good, skipped


# What `datasets.load_dataset` reads from a local folder that holds no images.
DATASET_FILE_SUFFIXES = frozenset({".parquet", ".arrow", ".csv", ".json", ".jsonl", ".tar", ".py"})


def is_image_folder(spec: str) -> bool:
    """A directory holding image files, and not a dataset saved with `save_to_disk`."""
    path = Path(spec)
    if not path.is_dir() or _is_saved_dataset(path):
        return False
    return any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for _, _, files in os.walk(path) for f in files)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def load_hub_source(spec: str, split: str, streaming: bool) -> Any:
    """Open a `datasets` source: `prefix:PATH`, a `save_to_disk` folder, a local dataset or a hub name."""
    import datasets  # imported here: a folder or the demo set should not pay for importing `datasets`

    prefix, _, rest = spec.partition(":")
    if prefix in BUILDER_PREFIXES and rest:
        location = {"data_dir": rest} if Path(rest).is_dir() else {"data_files": rest}
        return datasets.load_dataset(prefix, split=split, streaming=streaming, **location)
    if Path(spec).is_dir() and _is_saved_dataset(Path(spec)):
        loaded = datasets.load_from_disk(spec)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{spec} has splits {list(loaded)}, not split={split!r}")
            loaded = loaded[split]
        # Several shards so DataLoader workers can split the stream between them.
        return loaded.to_iterable_dataset(num_shards=min(len(loaded), 16)) if streaming else loaded
    if spec.startswith(("/", ".", "~")) and not Path(spec).expanduser().exists():
        raise ValueError(f"{spec}: no such file or directory (a hub name looks like owner/name)")
    if Path(spec).is_dir() and not any(Path(name).suffix.lower() in DATASET_FILE_SUFFIXES
                                       for _, _, files in os.walk(spec) for name in files):
        raise ValueError(f"{spec} is a folder with neither images ({', '.join(sorted(IMAGE_EXTENSIONS))}) nor "
                         "dataset files (Parquet, Arrow, CSV, JSON, WebDataset tars) in it")
    return datasets.load_dataset(spec, split=split, streaming=streaming)


def image_column_only(dataset: Any, column: str, spec: str, keep: tuple[str, ...] = ()) -> Any:
    """Keep just the image column, undecoded (`load_image` decodes it so a bad row is skipped, not fatal), and
    the `keep` columns, which the caller has checked."""
    import datasets

    names = dataset.column_names
    if names is not None and column not in names:
        raise ValueError(f"{spec} has no column {column!r}; its columns are {names}: name the image "
                         "column with --image_column")
    dataset = dataset.select_columns([column, *keep])
    if isinstance((dataset.features or {}).get(column), datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def open_reader(
    spec: str, split: str, image_column: str, min_size: int, id_column: str | None = None, scan: bool = True,
) -> tuple[ImageReader, list[Skip]]:
    """Random access to an image folder or a map-style `datasets` source, and the files skipped on the scan.

    `scan` reads every file's header first and leaves out the unreadable and tiny ones (training, evaluation);
    without it every file with an image extension is listed and errors surface when an image is read (dataset
    encoding, where opening millions of headers twice would cost more than it saves).
    """
    if is_url(spec):
        reader = UrlFolderImages(spec)
        if not len(reader):
            raise ValueError(f"{spec}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under this URL")
        return reader, []
    if is_image_folder(spec):
        paths = list_image_files(Path(spec))
        skipped: list[Skip] = []
        if scan:
            paths, skipped = scan_image_files(paths, min_size)
        if not paths:
            raise ValueError(f"{spec}: no usable images ({len(skipped)} skipped)")
        return FolderImages(Path(spec), paths), skipped
    dataset = load_hub_source(spec, split, False)
    names = dataset.column_names
    if id_column and id_column not in names:
        raise ValueError(f"{spec} has no column {id_column!r} for ids; its columns are {names}")
    dataset = image_column_only(dataset, image_column, spec, (id_column,) if id_column else ())
    return HubImages(dataset, image_column, spec, id_column), []


def load_demo_photos(names: tuple[str, ...]) -> ArrayImages:
    """The named scikit-image photos as RGB arrays (grayscale ones are expanded)."""
    import skimage.data

    arrays = []
    for name in names:
        # The motorcycle comes as a stereo pair; its left view is an ordinary photo.
        array = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        arrays.append(np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array)
    return ArrayImages([f"skimage.data.{name}" for name in names], arrays)


def measuring_batches(
    data: str | None, resolution: int, max_images: int, batch_size: int = 8,
    demo_photos: tuple[str, ...] = DEMO_VAL_PHOTOS,
) -> Iterator[torch.Tensor]:
    """Batches (B, 3, R, R) in [-1, 1] of the first `max_images` images of `data` under the evaluation protocol
    (`EvalCrop`), to measure a VAE on: `data` is an image folder or a `datasets` source, None the demo photos
    named by `demo_photos` (by default the held-out ones). Unreadable images are skipped."""
    if data is None:
        reader = load_demo_photos(demo_photos)
    else:
        reader, _ = open_reader(data, "train", "image", min_size=min(resolution, 64))
    crop = EvalCrop(resolution)
    count = min(len(reader), max_images)
    for start in range(0, count, batch_size):
        images = []
        for index in range(start, min(start + batch_size, count)):
            try:
                images.append(crop(reader.read(index)))
            except ImageError:
                continue
        if images:
            yield torch.stack(images)
