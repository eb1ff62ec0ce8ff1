"""The bookkeeping that makes a `vaegan encode` run exactly-once: the manifest that records the job's settings
(`vaegan.latents.job`), a record per committed shard, and the final manifest with the counts.

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

import json
import re
from pathlib import Path

from vaegan.autoencoder.network import AutoencoderKL, weights_sha256
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.images.buckets import ResolutionPolicy
from vaegan.latents.job import EncodeJob
from vaegan.latents.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SHARD_PATTERN,
    tensor_columns,
)
from vaegan.latents.sources import Source
from vaegan.utils.files import claim_json, differences, read_json, write_file_atomically, write_json

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


def claim_output(folder: Path, manifest: dict) -> None:
    """Write the initial manifest, or check that the one already there was written with the same settings."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        foreign = sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
        # Checked again after listing: whatever another rank has written implies its manifest exists by now.
        if foreign and not path.exists():
            raise ValueError(f"{folder} is not empty ({', '.join(foreign[:5])}) and holds no {MANIFEST_NAME}: "
                             "encode into a new or empty folder")
    existing = claim_json(path, manifest)
    if existing.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a vaegan latents manifest; encode into a new folder")
    changed = differences(existing, manifest, PLAN_KEYS)
    if changed:
        raise ValueError(
            f"{folder} holds latents encoded with other settings or from a changed source ({changed}); resuming "
            "would mix them. Rerun with the original settings, or encode into a new folder"
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
