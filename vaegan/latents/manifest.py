"""What one `vaegan encode` run is, and the bookkeeping that makes it exactly-once: the job's settings, the
manifest that records them, a record per committed shard, and the final manifest with the counts.

    OUT/manifest.json                  the VAE, normalisation, dtype, resolution policy, source, counts;
                                       "complete": true once every shard is done
    OUT/errors.jsonl                   one line per unusable input: {"id", "index", "shard", "reason"}
    OUT/.progress/shard-000000.json    per-shard commit record (rows, errors); written after the shard's Parquet

The first process writes the manifest with "complete": false; a rerun whose settings differ (`PLAN_KEYS`) or
whose source changed is refused, because mixing two encodings in one folder would break exactly-once. A shard
counts as done only when its record exists; whichever process finds every shard done writes errors.jsonl and
the final manifest (no process group needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from vaegan.autoencoder.codec import Tiling
from vaegan.autoencoder.network import AutoencoderKL
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.images.buckets import DEFAULT_MAX_ASPECT, ResolutionPolicy
from vaegan.latents.shards import (
    DEFAULT_SHARD_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    SHARD_PATTERN,
    STORAGE_TYPES,
    STORES,
    tensor_columns,
)
from vaegan.latents.sources import Source
from vaegan.utils.files import as_json, read_json, write_file_atomically, write_json

PROGRESS_DIR = ".progress"
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
# The manifest entries a rerun must agree on, or it would mix latents of different settings in one folder.
# (The source's path is not among them: the same folder may be named differently on a rerun.)
PLAN_KEYS = (
    "source.kind", "source.split", "source.image_column", "source.id_column", "source.items", "source.fingerprint",
    "shards", "resolution", "latents", "vae.sha256",
)
# The manifest quotes this many errors (errors.jsonl has them all), enough to see what went wrong at a glance.
ERRORS_IN_MANIFEST = 20


@dataclass(frozen=True, kw_only=True)
class EncodeJob:
    """Encode every image of a folder or a datasets source with a frozen VAE into Parquet shards that
    datasets.load_dataset("parquet", data_dir=OUTPUT) reads: one row per image with its id, latent (by default the
    normalised posterior mean and log-variance), latent shape, size and crop box; manifest.json and errors.jsonl
    beside them. Rerun the same command to resume after an interruption. Choose one resolution policy: crop,
    buckets or max_side.

    Args:
        model: any VAE vaegan reads: diffusers folder, single file, training checkpoint.
        input: an image folder (recursive), imagefolder:/webdataset:/parquet:/arrow:PATH, a save_to_disk folder,
            a local dataset folder or a hub name.
        output: folder for the shards; the same folder resumes.
        crop: shorter side resized to this, centre square crop (DiT, SD 1.x).
        buckets: aspect-ratio buckets of about this squared pixels, no distortion (SDXL, SD3, Flux).
        max_side: the image as it is, longer side capped at this, sides cut to multiples of step.
        step: bucket/max-side sides are multiples of this; default: 64 for buckets (SDXL's), the VAE's
            downsampling factor for max-side.
        max_aspect: most elongated bucket (4: 4:1).
        min_size: images with a shorter side below this are errors; default: half the size for crop and buckets,
            the step for max-side.
        split: split of a datasets source.
        image_column: image column of a datasets source (webdataset names it by extension, e.g. jpg).
        id_column: column whose value is the row's id (e.g. __key__ for webdataset); default: the row index.
        streaming: stream a datasets source instead of downloading it; one worker per source file.
        store: posterior: mean and logvar, so training can resample; mean or sample: half the size.
        latent_dtype: stored precision: fp16 (half of fp32's bytes; its 2^-11 relative rounding is far below what
            the VAE reconstructs), bf16 (stored as uint16 bits) or fp32.
        dtype: precision the VAE runs in (fp32: highest precision; bf16 on recent GPUs).
        device: cpu, cuda (one GPU per process) or cuda:N; default: cuda when available.
        batch_size: images per forward pass (batches hold one shape: bucket tails are smaller).
        shard_size: images per shard (streams keep one shard per source file).
        num_workers: image-decoding processes per encoding process; default: the free cores, at most 8.
        decode_jpeg: where JPEGs are decoded: workers (PIL, beside everything else) or device (torchvision's
            decode_jpeg on the encoding device, batched, nvjpeg on CUDA: for when the workers cannot keep up with a
            GPU; the workers then only read headers and plan crops). Other files, CMYK JPEGs and JPEGs the device
            refuses are read by PIL, image by image; pixels agree with PIL's within a level or two.
        num_processes: encoding processes on this machine, one GPU each with device cuda; under torchrun leave it
            at 1 (each launched process is one rank).
        seed: seeds the draws of store=sample, per shard, so reruns draw the same.
        tile_size: encode in tiles of this many pixels; default: only images above 1024^2.
        tiling: exact tiles encode what the untiled encoder would; blend is faster and approximate.
        compile: torch.compile the encoder (one graph per shape).
        preset: architecture preset (sd, sdxl, sd3, flux, tiny) for model files that carry no config.
        scaling_factor: override the VAE's scaling factor.
        shift_factor: override the VAE's shift factor.
        progress: show a progress bar with images/s, and a summary at the end.
    """

    model: str
    input: str
    output: str
    crop: int | None = None
    buckets: int | None = None
    max_side: int | None = None
    step: int | None = None
    max_aspect: float = DEFAULT_MAX_ASPECT
    min_size: int | None = None
    split: str = "train"
    image_column: str = "image"
    id_column: str | None = None
    streaming: bool = False
    store: Literal["posterior", "mean", "sample"] = "posterior"
    latent_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str | None = None
    batch_size: int = 16
    shard_size: int = DEFAULT_SHARD_SIZE
    num_workers: int | None = None
    decode_jpeg: Literal["workers", "device"] = "workers"
    num_processes: int = 1
    seed: int = 0
    tile_size: int | None = None
    tiling: Tiling = "exact"
    compile: bool = False
    preset: str | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "model", str(self.model))
        object.__setattr__(self, "input", str(self.input))
        object.__setattr__(self, "output", str(self.output))
        if len([size for size in (self.crop, self.buckets, self.max_side) if size is not None]) != 1:
            raise ValueError("choose exactly one resolution policy: crop=SIZE, buckets=SIZE or max_side=SIZE")
        if self.store not in STORES:
            raise ValueError(f"store={self.store!r}; choose one of {', '.join(STORES)}")
        if self.latent_dtype not in STORAGE_TYPES:
            raise ValueError(f"latent_dtype={self.latent_dtype!r}; choose one of {', '.join(STORAGE_TYPES)}")
        if self.batch_size < 1 or self.shard_size < 1 or self.num_processes < 1:
            raise ValueError("batch_size, shard_size and num_processes must be at least 1")



def resolution_policy(job: EncodeJob, factor: int) -> ResolutionPolicy:
    """The job's resolution policy, checked against the VAE's downsampling factor.

    (A function rather than a method: the command line builds `EncodeJob` from its fields, and would take a
    public method for a subcommand.)
    """
    kind, size = next((kind, size) for kind, size in
                      (("crop", job.crop), ("buckets", job.buckets), ("max-side", job.max_side)) if size is not None)
    return ResolutionPolicy.create(kind, size, factor, job.step, job.max_aspect, job.min_size)


def make_manifest(job: EncodeJob, source: Source, vae: AutoencoderKL, policy: ResolutionPolicy) -> dict:
    """manifest.json as first written (complete: false, no counts); `PLAN_KEYS` of it must match on resume."""
    config = vae.config
    storage = {"fp32": "float32", "fp16": "float16", "bf16": "uint16 bit patterns of bfloat16"}[job.latent_dtype]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "complete": False,
        "vae": {
            "source": str(Path(job.model).resolve()) if Path(job.model).exists() else job.model,
            "sha256": weights_sha256(vae), "config": config.to_dict(),
            "downsampling_factor": config.downsampling_factor, "latent_channels": config.latent_channels,
        },
        "latents": {
            "store": job.store, "columns": list(tensor_columns(job.store)), "dtype": job.latent_dtype,
            "storage": storage, "compute_dtype": job.dtype, "seed": job.seed if job.store == "sample" else None,
            # What the stored latents are: normalised with this (see vaegan.autoencoder.normalization); a posterior's
            # log-variance is moved with it (each channel's variance scales by its scale squared).
            "normalization": LatentNormalization.of(vae).to_json(),
        },
        "resolution": policy.to_json(),
        "source": {
            "input": job.input, "kind": source.kind, "split": job.split, "image_column": job.image_column,
            "id_column": job.id_column, "items": source.num_items, "fingerprint": source.fingerprint(),
        },
        "shards": {"count": source.num_shards, "size": None if source.kind == "stream" else job.shard_size,
                   "pattern": SHARD_PATTERN},
        "counts": None,
        "errors": None,
    }


def shard_metadata(manifest: dict) -> dict:
    """What each shard file carries about itself, so that it can be read (and decoded) without the manifest."""
    vae, latents = manifest["vae"], manifest["latents"]
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "store": latents["store"], "dtype": latents["dtype"],
        "normalization": latents["normalization"], "latent_channels": vae["latent_channels"],
        "downsampling_factor": vae["downsampling_factor"], "vae_sha256": vae["sha256"],
    }


def weights_sha256(vae: AutoencoderKL) -> str:
    """sha256 over the state dict (diffusers names, sorted, as fp32): one weights, one hash, in any file format."""
    digest = hashlib.sha256()
    for key, tensor in sorted(vae.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()


def _lookup(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def claim_output(folder: Path, manifest: dict) -> None:
    """Write the initial manifest, or check that the one already there was written with the same settings."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        foreign = sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
        # Checked again after listing: whatever another rank has written implies its manifest exists by now.
        if foreign and not path.exists():
            raise ValueError(f"{folder} is not empty ({', '.join(foreign[:5])}) and holds no {MANIFEST_NAME}: "
                             "encode into a new or empty folder")
        temporary = folder / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
        write_json(temporary, manifest)
        try:
            os.link(temporary, path)  # atomic and exclusive: of ranks starting together, one writes it
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
    existing = read_json(path)
    if existing.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a vaegan latents manifest; encode into a new folder")
    differences = [key for key in PLAN_KEYS if _lookup(existing, key) != _lookup(as_json(manifest), key)]
    if differences:
        raise ValueError(
            f"{folder} holds latents encoded with other settings or from a changed source ({', '.join(differences)} "
            "differ); resuming would mix them. Rerun with the original settings, or encode into a new folder"
        )


def finalize(folder: Path, manifest: dict) -> dict | None:
    """If every shard is done: write errors.jsonl and the complete manifest, return the latter; else None."""
    records = read_records(folder)
    if any(shard not in records for shard in range(manifest["shards"]["count"])):
        return None
    errors = [error for shard in sorted(records) for error in records[shard]["errors"]]
    text = "".join(json.dumps(error) + "\n" for error in errors)
    write_file_atomically(folder / ERRORS_NAME, lambda file: file.write_text(text))
    shapes: dict[str, int] = {}
    for record in records.values():
        for shape, count in record["shapes"].items():
            shapes[shape] = shapes.get(shape, 0) + count
    manifest = manifest | {"complete": True, "counts": {
        "items": sum(record["items"] for record in records.values()),
        "encoded": sum(record["rows"] for record in records.values()),
        "errors": len(errors),
        "files": sum(1 for record in records.values() if record["file"]),
        "bytes": sum(record["bytes"] for record in records.values()),
        "latent_shapes": dict(sorted(shapes.items(), key=lambda item: -item[1])),
    }, "errors": {"file": ERRORS_NAME, "count": len(errors), "first": errors[:ERRORS_IN_MANIFEST]}}
    write_json(folder / MANIFEST_NAME, manifest)
    remove_temporary_files(folder)
    return manifest


def record_path(folder: Path, shard: int) -> Path:
    return folder / PROGRESS_DIR / f"shard-{shard:06d}.json"


def write_record(folder: Path, record: dict) -> None:
    """Mark a shard done: its Parquet file (if any) is already in place."""
    write_json(record_path(folder, record["shard"]), record)


def read_records(folder: Path) -> dict[int, dict]:
    """The progress records of the done shards, by shard number."""
    records = {}
    for path in sorted((folder / PROGRESS_DIR).glob("shard-*.json")):
        match = re.fullmatch(r"shard-(\d+)\.json", path.name)
        if match:
            records[int(match[1])] = read_json(path)
    return records


def remove_temporary_files(folder: Path) -> None:
    """Shard files that killed processes left half-written (only safe once every shard is done).

    Not the manifest's or errors.jsonl's temporary files: another process may be finalizing at the same moment.
    """
    for pattern in (f".{SHARD_PATTERN}.*.tmp", f"{PROGRESS_DIR}/.shard-*.tmp"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)
