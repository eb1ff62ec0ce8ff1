"""The bookkeeping that makes a `vaegan encode` run exactly-once: the manifest that records the job's settings
(`vaegan.latents.job`), a record per committed shard, and the final manifest with the counts.

    OUT/manifest.json                  the VAE, normalisation, dtype, resolution policy, source, counts;
                                       "complete": true once every shard is done
    OUT/errors.jsonl                   one line per unusable input: {"id", "index", "shard", "reason"}
    OUT/.progress/shard-000000.json    per-shard commit record (rows, errors, the file); written after the
                                       shard's Parquet file is staged, before it is published
                                       (`vaegan.latents.shards`)

The first process writes the manifest with "complete": false; a rerun whose settings differ (`PLAN_KEYS`) or
whose source changed is refused, because mixing two encodings in one folder would break exactly-once. A shard
counts as done only when its record exists; whichever process finds every shard done writes errors.jsonl and
the final manifest (no process group needed). OUT is a local folder or an object-store URL
(`vaegan.latents.store`).
"""

from __future__ import annotations

import json
import os
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
    STAGING_DIR,
    shard_name,
    tensor_columns,
)
from vaegan.latents.sources import Source
from vaegan.latents.store import Store
from vaegan.utils.files import differences

PROGRESS_DIR = ".progress"
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
# The manifest entries a rerun must agree on, or it would mix latents of different settings in one folder.
# (The source's path is not among them: the same folder may be named differently on a rerun.)
PLAN_KEYS = (
    "source.kind", "source.split", "source.image_column", "source.id_column", "source.keep_columns", "source.items",
    "source.fingerprint",
    "shards", "resolution", "latents", "vae.sha256",
)
# The manifest quotes this many errors (errors.jsonl has them all), enough to see what went wrong at a glance.
ERRORS_IN_MANIFEST = 20


def make_manifest(job: EncodeJob, source: Source, vae: AutoencoderKL, policy: ResolutionPolicy) -> dict:
    """manifest.json as first written (complete: false, no counts); `PLAN_KEYS` of it must match on resume."""
    config = vae.config
    storage = {"fp32": "float32", "fp16": "float16", "bf16": "uint16 bit patterns of bfloat16",
               "uint8": "uint8 codes of a per-channel affine map (see quantization)"}[job.latent_dtype]
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
            "id_column": job.id_column, "keep_columns": list(job.keep_columns) or None, "items": source.num_items,
            "fingerprint": source.fingerprint(),
        },
        # A stream and a list of files are cut by their files (one shard each), the rest by shard_size.
        "shards": {"count": source.num_shards, "size": None if source.num_items is None else job.shard_size,
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
        "kept_columns": manifest["source"]["keep_columns"] or [],
        "quantization": manifest.get("quantization"),
    }


def claim_output(store: Store, manifest: dict) -> dict:
    """Write the initial manifest, or check that the one already there was written with the same settings; returns
    the manifest in force (another process's, or an earlier run's, may carry its own uint8 calibration)."""
    if not store.exists(MANIFEST_NAME):
        foreign = store.entries()
        # Checked again after listing: whatever another rank has written implies its manifest exists by now.
        if foreign and not store.exists(MANIFEST_NAME):
            raise ValueError(f"{store} is not empty ({', '.join(foreign[:5])}) and holds no {MANIFEST_NAME}: "
                             "encode into a new or empty folder")
    existing = store.claim_json(MANIFEST_NAME, manifest)
    if existing.get("format") != FORMAT_NAME:
        raise ValueError(f"{store.url_of(MANIFEST_NAME)} is not a vaegan latents manifest; encode into a new folder")
    changed = differences(existing, manifest, PLAN_KEYS)
    if changed:
        raise ValueError(
            f"{store} holds latents encoded with other settings or from a changed source ({changed}); resuming "
            "would mix them. Rerun with the original settings, or encode into a new folder"
        )
    return existing


def finalize(store: Store, manifest: dict) -> dict | None:
    """If every shard is done: publish what is not yet, write errors.jsonl and the complete manifest, and return
    the latter; else None."""
    records = read_records(store)
    if any(shard not in records for shard in range(manifest["shards"]["count"])):
        return None
    publish_committed(store, records)
    errors = [error for shard in sorted(records) for error in records[shard]["errors"]]
    text = "".join(json.dumps(error) + "\n" for error in errors)
    store.write_text(ERRORS_NAME, text)
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
        "clipped_values": sum(record.get("clipped", 0) for record in records.values()),  # uint8 only
    }, "errors": {"file": ERRORS_NAME, "count": len(errors), "first": errors[:ERRORS_IN_MANIFEST]}}
    store.write_json(MANIFEST_NAME, manifest)
    remove_abandoned_files(store, records)
    return manifest


def record_name(shard: int) -> str:
    return f"{PROGRESS_DIR}/shard-{shard:06d}.json"


def commit_shard(store: Store, record: dict) -> None:
    """Steps 2 and 3 of the protocol in `vaegan.latents.shards`: write the record that commits the shard, then
    publish its staged file."""
    store.write_json(record_name(record["shard"]), record)
    publish(store, record)


def publish(store: Store, record: dict) -> None:
    """Give a committed shard's staged file its final name; a shard of errors only leaves no file (an earlier,
    different attempt must not survive as one)."""
    if record["file"] is None:
        store.remove(shard_name(record["shard"]))
    elif record.get("staged"):
        store.publish(record["staged"], record["file"])


def publish_committed(store: Store, records: dict[int, dict], shards: list[int] | None = None) -> None:
    """Publish the committed shards (of `shards`, default all) whose staged file is still there: a process was
    killed between its commit and its publish."""
    staged = set(store.names(f"{STAGING_DIR}/*"))
    for shard, record in sorted(records.items()):
        if (shards is None or shard in shards) and record.get("staged") in staged:
            publish(store, record)


def read_records(store: Store) -> dict[int, dict]:
    """The progress records of the done shards, by shard number (fetched at once from an object store)."""
    names = [name for name in store.names(f"{PROGRESS_DIR}/shard-*.json")
             if re.fullmatch(rf"{PROGRESS_DIR}/shard-\d+\.json", name)]
    if store.is_local:
        values = {name: store.read_json(name) for name in names}
    else:
        contents = store.fs.cat([store.path(name) for name in names]) if names else {}
        values = {name: json.loads(contents[store.path(name)]) for name in names}
    return {int(re.search(r"(\d+)\.json$", name)[1]): value for name, value in values.items()}


def committed_files(store: Store) -> list[str]:
    """The shard files to read, in shard order: what the records name, published or still staged. A folder of
    shards without records (copied without its books, or written before records existed): its `train-*` files."""
    records = read_records(store)
    if not records:
        return store.names(SHARD_PATTERN)
    published, staged = set(store.names(SHARD_PATTERN)), set(store.names(f"{STAGING_DIR}/*"))
    files = []
    for _, record in sorted(records.items()):
        if record["file"] is None:
            continue
        if record.get("staged") in staged:  # committed, not yet published: the staged file is the shard
            files.append(record["staged"])
        elif record["file"] in published:
            files.append(record["file"])
        else:
            raise ValueError(f"{store.url_of(record['file'])}: committed but missing; was it deleted?")
    return files


def remove_abandoned_files(store: Store, records: dict[int, dict]) -> None:
    """Staged files no record names: attempts killed before their commit (only safe once every shard is done).
    Not the temporary files of the manifest or errors.jsonl: another process may be finalizing at this moment."""
    named = {record.get("staged") for record in records.values()}
    for name in store.names(f"{STAGING_DIR}/*"):
        if name not in named:
            store.remove(name)
    if store.is_local:  # temporary files of the protocol before staging existed
        for name in store.names(f".{SHARD_PATTERN}.*.tmp") + store.names(f"{PROGRESS_DIR}/.shard-*.tmp"):
            store.remove(name)


def shard_files(path: str | os.PathLike) -> tuple[Store, list[str]]:
    """The store and committed shard files of an encode folder (`committed_files`), or a single shard file's
    folder and its name."""
    text = str(path)
    if text.endswith(".parquet"):
        folder, _, name = text.rstrip("/").rpartition("/")
        store = Store(folder or ".")
        if not store.exists(name):
            raise FileNotFoundError(f"{path}: no such latent shard file")
        return store, [name]
    store = Store(path)
    if not store.fs.isdir(store.root):
        raise FileNotFoundError(f"{path}: no such latent folder or shard file")
    files = committed_files(store)
    if not files:
        raise FileNotFoundError(f"{path}: no committed latent shards ({SHARD_PATTERN}) in this folder")
    return store, files
