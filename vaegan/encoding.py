"""Encode an image dataset into latent shards with a frozen VAE: resumable, exactly once, on many processes.

    vaegan encode --model out/sd-vae --input /data/images --output /data/latents --buckets 1024 --device cuda

How the work is cut up, and why that makes a rerun safe:
  * The source is listed in a fixed order: image files sorted by path (recursively), `datasets` rows by index,
    a streamed `datasets` source by its own source shards (files). Shard k of the output is items
    [k * shard_size, (k + 1) * shard_size) of that order (for a stream: all rows of source shard k), so which
    image belongs to which shard never depends on the run, the number of processes or what is already done.
  * Process (rank) r of w encodes the shards k with k % w == r; its DataLoader workers split those shards
    between them, each worker reading whole shards, so all batches of a shard come from one worker, in order.
  * A shard is committed atomically (see `vaegan.shards`): a killed run leaves whole shards or none, a rerun
    skips the committed ones and redoes the rest. No image is lost or written twice, whatever was killed when.
  * The first process writes manifest.json with the settings (VAE hash, policy, source size, dtype ...) and
    "complete": false; a rerun with different settings or a changed source is refused, because mixing them
    would break exactly-once. The process that commits the last shard (there is no need for a process group:
    any process that finds every shard done) writes errors.jsonl and the final manifest with the counts.

Unreadable inputs (corrupt, zero-byte, not an image, tiny, a sliver the policy cannot use, a latent that is
not finite in the storage dtype) are listed in errors.jsonl with the reason; the run goes on. A failure to read
the source itself (a broken tar, a network error) stops the run: rerun it to resume.

Several processes: `num_processes=N` (`--num-processes N`) starts N ranks on this machine (one GPU each with
device "cuda", or CPU processes sharing the cores); under `torchrun` (RANK, WORLD_SIZE and LOCAL_RANK set, on
one node or many with the output on a shared file system) each launched process is one rank.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vaegan.autoencoder import AutoencoderKL
from vaegan.buckets import DEFAULT_MAX_ASPECT, ResolutionPolicy
from vaegan.codec import Codec, resolve_dtype
from vaegan.formats import load
from vaegan.shards import (
    DEFAULT_SHARD_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_PATTERN,
    STORAGE_TYPES,
    STORES,
    ShardWriter,
    claim_output,
    encode_values,
    finalize,
    nested,
    read_json,
    read_records,
    schema,
    tensor_columns,
    weights_sha256,
)
from vaegan.sources import ShardBatches, Source, open_source


@dataclass(frozen=True)
class EncodeJob:
    """Everything a rank needs, flat and picklable (it travels to spawned processes); see `encode_dataset`."""

    model: str
    input: str
    output: str
    policy: str
    size: int
    step: int | None = None
    max_aspect: float = DEFAULT_MAX_ASPECT
    min_size: int | None = None
    split: str = "train"
    image_column: str = "image"
    id_column: str | None = None
    streaming: bool = False
    store: str = "posterior"
    latent_dtype: str = "fp16"
    dtype: str = "fp32"
    device: str = "cpu"
    batch_size: int = 16
    shard_size: int = DEFAULT_SHARD_SIZE
    num_workers: int = 2
    seed: int = 0
    tile_size: int | None = None
    compile: bool = False
    config: str | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None


# ---- the manifest ----


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
            "scaling_factor": config.scaling_factor, "shift_factor": config.shift_factor or 0.0,
            "downsampling_factor": config.downsampling_factor, "latent_channels": config.latent_channels,
        },
        "latents": {
            "store": job.store, "columns": list(tensor_columns(job.store)), "dtype": job.latent_dtype,
            "storage": storage, "compute_dtype": job.dtype, "seed": job.seed if job.store == "sample" else None,
            "normalisation": "(z - shift_factor) * scaling_factor; logvar + 2 * ln(scaling_factor)",
        },
        "resolution": policy.describe(),
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
    vae = manifest["vae"]
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "store": manifest["latents"]["store"],
        "dtype": manifest["latents"]["dtype"], "scaling_factor": vae["scaling_factor"],
        "shift_factor": vae["shift_factor"], "latent_channels": vae["latent_channels"],
        "downsampling_factor": vae["downsampling_factor"], "vae_sha256": vae["sha256"],
    }


# ---- one rank ----


class Progress:
    """Counts images for a progress bar; the base class counts silently."""

    def start(self, total: int | None) -> None: ...
    def update(self, count: int) -> None: ...
    def close(self) -> None: ...


class BarProgress(Progress):
    """A tqdm bar in images (its rate is images/s)."""

    def start(self, total: int | None) -> None:
        self.bar = tqdm(total=total, unit="img", desc="encoding", smoothing=0.1)

    def update(self, count: int) -> None:
        self.bar.update(count)

    def close(self) -> None:
        self.bar.close()


class SharedProgress(Progress):
    """Counts into shared values that the launching process shows as one bar for all ranks."""

    def __init__(self, done: Any, total: Any):
        self.done, self.total = done, total

    def start(self, total: int | None) -> None:
        with self.total.get_lock():
            self.total.value += total or 0

    def update(self, count: int) -> None:
        with self.done.get_lock():
            self.done.value += count


def rank_device(device: str, local_rank: int, local_world_size: int) -> torch.device:
    """"cuda" means this rank's GPU (cuda:LOCAL_RANK) when several processes share a machine."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and local_world_size > 1:
        return torch.device("cuda", local_rank)
    return resolved


def encode_rank(
    job: EncodeJob, rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1,
    progress: Progress | None = None,
) -> dict:
    """Encode this rank's shards that are not done yet; returns its counts and timings (see `EncodeSummary`)."""
    progress = progress or Progress()
    folder = Path(job.output)
    folder.mkdir(parents=True, exist_ok=True)
    source = open_source(job.input, job.shard_size, job.split, job.image_column, job.id_column, job.streaming)
    if source.num_shards == 0:
        raise ValueError(f"{job.input}: no images to encode")
    vae = load(job.model, config=job.config, scaling_factor=job.scaling_factor, shift_factor=job.shift_factor)
    policy = ResolutionPolicy.create(job.policy, job.size, vae.config.downsampling_factor, job.step,
                                     job.max_aspect, job.min_size)
    manifest = make_manifest(job, source, vae, policy)
    claim_output(folder, manifest)
    done = read_records(folder)
    mine = [shard for shard in range(source.num_shards) if shard % world_size == rank]
    pending = [shard for shard in mine if shard not in done]
    skipped = sum(done[shard]["items"] for shard in mine if shard in done)
    if source.kind == "stream" and len(pending) < job.num_workers:
        print(f"rank {rank}: {len(pending)} source shards to read for {job.num_workers} workers; the rest idle "
              "(a stream is read one source shard per worker; load it without streaming to read it in parallel)")

    device = rank_device(job.device, local_rank, local_world_size)
    codec = Codec(vae, device=device, dtype=job.dtype, batch_size=job.batch_size, tile_size=job.tile_size,
                  compile=job.compile)
    encoder = BatchEncoder(codec, job, schema(job.store, job.latent_dtype, shard_metadata(manifest)), folder)
    loader = DataLoader(
        ShardBatches(source, pending, policy, job.batch_size), batch_size=None, num_workers=job.num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if job.num_workers else None,
        multiprocessing_context=worker_start_method() if job.num_workers else None,
    )
    progress.start(None if source.num_items is None else sum(_shard_items(source, shard) for shard in pending))
    start = time.perf_counter()
    waiting = 0.0
    try:
        batches = iter(loader)
        while True:
            before = time.perf_counter()
            batch = next(batches, None)
            waiting += time.perf_counter() - before
            if batch is None:
                break
            progress.update(encoder.add(batch))
        encoder.finish()
    finally:
        encoder.abort()
        progress.close()
    seconds = time.perf_counter() - start
    complete = finalize(folder, manifest) is not None
    return {
        "rank": rank, "world_size": world_size, "device": str(device), "shards": len(pending),
        "encoded": encoder.encoded, "errors": encoder.errors, "skipped": skipped,
        "seconds": seconds, "data_wait_seconds": waiting, "complete": complete,
    }


def worker_start_method() -> str | None:
    """Fork DataLoader workers on Linux, as PyTorch does by default there.

    Said explicitly because ranks started by `launch` are spawned, and inside a spawned process multiprocessing
    defaults to spawn too: every worker would then re-import torch and vaegan (10 s per worker on 2 cores).
    """
    return "fork" if sys.platform == "linux" else None


def _shard_items(source: Source, shard: int) -> int:
    return min(source.shard_size, source.num_items - shard * source.shard_size)


@dataclass
class _InFlight:
    batch: dict[str, Any]
    latents: dict[str, torch.Tensor]  # storage dtype, on the host (being copied there when `ready` is set)
    ready: torch.cuda.Event | None


class BatchEncoder:
    """The main process's side: encode each batch, write its rows to its shard, commit shards as they end.

    The device runs one batch ahead of the host: batch i+1 is launched before the rows of batch i are
    converted and written, and the device-to-host copy is asynchronous, so the GPU does not wait on Parquet.
    """

    def __init__(self, codec: Codec, job: EncodeJob, shard_schema: Any, folder: Path):
        self.codec, self.job, self.schema, self.folder = codec, job, shard_schema, folder
        self.scale, self.shift = codec.scaling_factor, codec.shift_factor
        self.writers: dict[int, ShardWriter] = {}
        self.generators: dict[int, torch.Generator] = {}
        self.late_errors: dict[int, list[dict]] = {}  # latents that are not finite in the storage dtype
        self.in_flight: _InFlight | None = None
        self.encoded = self.errors = 0

    def add(self, batch: dict[str, Any]) -> int:
        """Take one batch or end marker from the loader; returns how many images it settled."""
        if batch.get("end"):
            written = self._write(self.in_flight)
            self.in_flight = None
            shard = batch["shard"]
            writer = self.writers.pop(shard, None) or ShardWriter(self.folder, shard, self.schema)
            errors = batch["errors"] + self.late_errors.pop(shard, [])
            writer.commit(batch["items"], sorted(errors, key=lambda error: error["index"]))
            self.generators.pop(shard, None)
            self.errors += len(batch["errors"])
            return written + len(batch["errors"])
        launched = self._launch(batch)
        written = self._write(self.in_flight)
        self.in_flight = launched
        return written

    def finish(self) -> None:
        self._write(self.in_flight)
        self.in_flight = None
        if self.writers:
            raise RuntimeError(f"shards {sorted(self.writers)} got no end marker; not committed")

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()

    @torch.inference_mode()
    def _launch(self, batch: dict[str, Any]) -> _InFlight:
        codec = self.codec
        pixels = batch["pixels"].to(codec.device, non_blocking=True)  # (B, 3, H, W) uint8
        posterior = codec.posterior(pixels)
        if self.job.store == "posterior":
            latents = {
                "mean": (posterior.mean - self.shift) * self.scale,
                "logvar": posterior.logvar + 2.0 * math.log(self.scale),
            }
        elif self.job.store == "mean":
            latents = {"latent": (posterior.mean - self.shift) * self.scale}
        else:
            # One generator per shard, seeded by the shard: a rerun draws the same samples.
            generator = self.generators.get(batch["shard"])
            if generator is None:
                generator = torch.Generator(codec.device).manual_seed(self.job.seed * 1_000_003 + batch["shard"])
                self.generators[batch["shard"]] = generator
            latents = {"latent": (posterior.sample(generator) - self.shift) * self.scale}
        stored = {name: value.to(resolve_dtype(self.job.latent_dtype)) for name, value in latents.items()}
        if codec.device.type != "cuda":
            return _InFlight(batch, stored, None)
        host = {}
        for name, value in stored.items():
            host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host[name].copy_(value, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _InFlight(batch, host, ready)

    def _write(self, flight: _InFlight | None) -> int:
        if flight is None:
            return 0
        if flight.ready is not None:
            flight.ready.synchronize()
        batch, shard = flight.batch, flight.batch["shard"]
        finite = torch.stack([value.isfinite().flatten(1).all(1) for value in flight.latents.values()]).all(0)
        for position in (~finite).nonzero().flatten().tolist():
            self.late_errors.setdefault(shard, []).append({
                "id": batch["id"][position], "index": int(batch["index"][position]), "shard": shard,
                "reason": f"{batch['id'][position]}: latent not finite in {self.job.latent_dtype} (overflow or a "
                          "broken model); store fp32 or bf16",
            })
        keep = finite.nonzero().flatten()
        self.errors += len(finite) - len(keep)
        if len(keep) == 0:
            return len(finite)
        storage = STORAGE_TYPES[self.job.latent_dtype]
        pixels_height, pixels_width = batch["pixels"].shape[-2:]
        columns: dict[str, Any] = {
            "id": [batch["id"][position] for position in keep.tolist()],
            "index": batch["index"][keep].numpy(),
        }
        for name, value in flight.latents.items():
            columns[name] = nested(encode_values(value[keep], self.job.latent_dtype), storage)
        channels, height, width = next(iter(flight.latents.values())).shape[1:]
        columns |= {
            "latent_shape": [[channels, height, width]] * len(keep),
            "height": np.full(len(keep), pixels_height, np.int32),
            "width": np.full(len(keep), pixels_width, np.int32),
            "source_height": batch["source_size"][keep, 0].numpy(),
            "source_width": batch["source_size"][keep, 1].numpy(),
            "crop_box": batch["box"][keep].tolist(),
        }
        writer = self.writers.get(shard)
        if writer is None:
            writer = self.writers[shard] = ShardWriter(self.folder, shard, self.schema)
        writer.add(columns)
        self.encoded += len(keep)
        return len(finite)


# ---- launching and summary ----


@dataclass
class EncodeSummary:
    """What one `encode_dataset` call did (over all its ranks) and, when the folder is complete, its manifest."""

    output: Path
    encoded: int  # images encoded by this call
    errors: int  # unusable inputs met by this call (errors.jsonl lists all of them, of every run)
    skipped: int  # items of shards already done before this call
    seconds: float  # wall time of the slowest rank's encoding loop
    data_wait: float  # share of that time the encoding loops spent waiting for a batch (mean over ranks)
    manifest: dict | None  # the final manifest when every shard is done, else None
    ranks: list[dict] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.encoded + self.errors) / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        lines = [
            f"encoded {self.encoded} images, {self.errors} errors, {self.skipped} skipped (already done) in "
            f"{self.seconds:.1f} s: {self.images_per_second:.1f} images/s, {100 * self.data_wait:.0f}% of the "
            f"time waiting for data ({len(self.ranks)} process{'es' if len(self.ranks) > 1 else ''})"
        ]
        if self.manifest is None:
            lines.append(f"{self.output}: not complete yet (other ranks still running, or rerun to resume)")
        else:
            counts = self.manifest["counts"]
            lines.append(
                f"{self.output}: {counts['encoded']} latents in {counts['files']} shards, "
                f"{counts['bytes'] / 2**20:.1f} MiB; {counts['errors']} errors listed in errors.jsonl"
            )
        return "\n".join(lines)


def torchrun_rank() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's environment, or a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0, 1
    return (int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_num_workers(local_processes: int) -> int:
    """Data-loading processes per rank: the cores left after the ranks themselves, at most 8, at least 1."""
    return max(1, min(8, (os.cpu_count() or 2) // local_processes - 1))


def encode_dataset(
    model: str | os.PathLike,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    crop: int | None = None,
    buckets: int | None = None,
    max_side: int | None = None,
    step: int | None = None,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    min_size: int | None = None,
    split: str = "train",
    image_column: str = "image",
    id_column: str | None = None,
    streaming: bool = False,
    store: str = "posterior",
    latent_dtype: str = "fp16",
    dtype: str = "fp32",
    device: str | None = None,
    batch_size: int = 16,
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_workers: int | None = None,
    num_processes: int = 1,
    seed: int = 0,
    tile_size: int | None = None,
    compile: bool = False,
    config: str | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    progress: bool = True,
) -> EncodeSummary:
    """Encode every image of `input` with the VAE at `model` into latent shards in `output` (see the module doc).

    Args:
        model: any VAE `vaegan.load` reads (diffusers folder, single file, training checkpoint); `config`,
            `scaling_factor`, `shift_factor` as for `vaegan.load`.
        input: an image folder (recursive), `imagefolder:`/`webdataset:`/`parquet:`/`arrow:PATH`, a
            `save_to_disk` folder or a hub name (see `vaegan.data.ImageDataModule`); `split`, `image_column`,
            `streaming` apply to `datasets` sources, `id_column` names a column to take ids from.
        output: the folder of shards; rerunning the same call resumes it.
        crop / buckets / max_side: the resolution policy, exactly one (see `vaegan.buckets`): a square crop of
            this side; buckets under a budget of buckets^2 pixels; or the longer side capped at this.
        step, max_aspect, min_size: policy details (`ResolutionPolicy.create`).
        store: "posterior" (mean and logvar: training can resample), "mean" or "sample" (half the size).
        latent_dtype: fp16 (default: half of fp32's bytes; its 2^-11 relative rounding is far below what the
            VAE reconstructs), bf16 (stored as uint16 bits) or fp32.
        dtype: precision the VAE runs in (fp32 by default: highest precision; bf16 on recent GPUs).
        device: "cpu", "cuda" (each rank takes its own GPU) or "cuda:N"; default cuda when available.
        batch_size: images per forward pass (batches hold one shape: bucket tails are smaller).
        shard_size: images per shard (ignored for streams, whose shards follow the source's).
        num_workers: image-decoding processes per rank; default: the cores left, at most 8.
        num_processes: ranks to start on this machine; 1 also runs as one rank of a torchrun launch.
        seed: seeds the samples of store="sample" (per shard, so reruns draw the same).
        tile_size, compile: passed to `vaegan.Codec`.
        progress: show a progress bar (rank 0, or the launching process).
    """
    policies = {"crop": crop, "buckets": buckets, "max-side": max_side}
    chosen = [(kind, size) for kind, size in policies.items() if size is not None]
    if len(chosen) != 1:
        raise ValueError("choose exactly one resolution policy: crop=SIZE, buckets=SIZE or max_side=SIZE")
    if store not in STORES:
        raise ValueError(f"store={store!r}; choose one of {', '.join(STORES)}")
    if latent_dtype not in STORAGE_TYPES:
        raise ValueError(f"latent_dtype={latent_dtype!r}; choose one of {', '.join(STORAGE_TYPES)}")
    if batch_size < 1 or shard_size < 1 or num_processes < 1:
        raise ValueError("batch_size, shard_size and num_processes must be at least 1")
    rank, world_size, local_rank, local_world_size = torchrun_rank()
    if num_processes > 1 and world_size > 1:
        raise ValueError("num_processes > 1 inside a torchrun launch: let torchrun start the processes")
    local_processes = max(num_processes, local_world_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and local_processes > torch.cuda.device_count():
        raise ValueError(f"{local_processes} processes on this machine but {torch.cuda.device_count()} GPUs")
    job = EncodeJob(
        model=str(model), input=str(input), output=str(output), policy=chosen[0][0], size=chosen[0][1], step=step,
        max_aspect=max_aspect, min_size=min_size, split=split, image_column=image_column, id_column=id_column,
        streaming=streaming, store=store, latent_dtype=latent_dtype, dtype=dtype, device=device,
        batch_size=batch_size, shard_size=shard_size,
        num_workers=default_num_workers(local_processes) if num_workers is None else num_workers, seed=seed,
        tile_size=tile_size, compile=compile, config=config, scaling_factor=scaling_factor, shift_factor=shift_factor,
    )
    if num_processes > 1:
        results = launch(job, num_processes, progress)
    else:
        bar = BarProgress() if progress and rank == 0 else None
        results = [encode_rank(job, rank, world_size, local_rank, local_world_size, bar)]
    manifest_path = Path(output) / MANIFEST_NAME
    manifest = read_json(manifest_path) if any(result["complete"] for result in results) else None
    return EncodeSummary(
        output=Path(output),
        encoded=sum(result["encoded"] for result in results),
        errors=sum(result["errors"] for result in results),
        skipped=sum(result["skipped"] for result in results),
        seconds=max(result["seconds"] for result in results),
        data_wait=float(np.mean([result["data_wait_seconds"] / max(result["seconds"], 1e-9) for result in results])),
        manifest=manifest,
        ranks=results,
    )


def launch(job: EncodeJob, num_processes: int, progress: bool) -> list[dict]:
    """Run `num_processes` ranks as fresh processes on this machine; one progress bar counts them all.

    Fresh ("spawn") processes, not forks: each rank then starts its own CUDA context and DataLoader workers. A
    rank that fails does not stop the others (their shards are still worth having); the failure is raised once
    all have ended, and a rerun redoes only what is missing.
    """
    context = mp.get_context("spawn")
    done, total = context.Value("q", 0), context.Value("q", 0)
    results = context.Queue()
    processes = [
        context.Process(target=_rank_process, args=(job, rank, num_processes, done, total, results), daemon=False)
        for rank in range(num_processes)
    ]
    for process in processes:
        process.start()
    bar = tqdm(total=0, unit="img", desc=f"encoding ({num_processes} processes)", disable=not progress)
    collected: list[dict] = []
    while len(collected) < num_processes:
        try:
            collected.append(results.get(timeout=0.5))
        except queue.Empty:
            if not any(process.is_alive() for process in processes):
                break
        bar.total = total.value
        bar.update(done.value - bar.n)
    bar.close()
    for process in processes:
        process.join()
    failures = [result for result in collected if "error" in result]
    failures += [{"rank": rank, "error": f"exit code {process.exitcode}"} for rank, process in enumerate(processes)
                 if process.exitcode and all(result["rank"] != rank for result in collected)]
    if failures:
        reasons = "; ".join(f"rank {failure['rank']}: {failure['error']}" for failure in failures)
        raise RuntimeError(f"encoding failed in {len(failures)} process(es): {reasons}. Rerun to resume")
    return sorted(collected, key=lambda result: result["rank"])


def _rank_process(job: EncodeJob, rank: int, world_size: int, done: Any, total: Any, results: Any) -> None:
    if torch.device(job.device).type == "cpu":
        # Ranks share the cores: without this each would start one thread per core and they would thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        results.put(encode_rank(job, rank, world_size, rank, world_size, SharedProgress(done, total)))
    except BaseException as error:
        traceback.print_exc()
        results.put({"rank": rank, "error": f"{type(error).__name__}: {error}"})
        raise SystemExit(1) from error
