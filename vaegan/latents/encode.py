"""Encode an image dataset into latent shards with a frozen VAE: resumable, exactly once, on many processes.

    vaegan encode --model out/sd-vae --input /data/images --output /data/latents --buckets 1024 --device cuda

How the work is cut up, and why that makes a rerun safe:
  * The source is listed in a fixed order and shard k is a fixed part of it (`vaegan.latents.sources`), so which image
    belongs to which shard never depends on the run, the number of processes or what is already done.
  * Process (rank) r of w encodes the shards k with k % w == r; its DataLoader workers split those shards
    between them, each worker reading whole shards, so all batches of a shard come from one worker, in order.
  * A shard is committed whole or not at all (`vaegan.latents.shards`, `vaegan.latents.manifest`), by the same
    protocol on a local disk and on an object store: a rerun skips the committed ones and redoes the rest. No
    image is lost or written twice, whatever was killed when; a rerun with other settings or a changed source
    is refused.

Unreadable inputs (corrupt, zero-byte, not an image, tiny, a sliver the policy cannot use, a latent that is
not finite in the storage dtype) are listed in errors.jsonl with the reason; the run goes on. A failure to read
the source itself (a broken tar, a network error) stops the run: rerun it to resume.

Several processes: `num_processes=N` starts N ranks on this machine (one GPU each with device "cuda", or CPU
processes sharing the cores); under `torchrun` (on one node or many, with the output on a shared file system)
each launched process is one rank (`vaegan.latents.launcher`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vaegan.autoencoder.codec import Codec
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.formats.load import load
from vaegan.latents.job import EncodeJob, resolution_policy
from vaegan.latents.launcher import Rank, SharedProgress, default_num_workers, launch, worker_start_method
from vaegan.latents.manifest import (
    MANIFEST_NAME,
    claim_output,
    commit_shard,
    finalize,
    make_manifest,
    publish_committed,
    read_records,
    shard_metadata,
)
from vaegan.latents.shards import STORAGE_TYPES, ShardWriter, encode_values, nested, schema
from vaegan.latents.sources import ImageBatch, ShardBatches, ShardEnd, open_source
from vaegan.latents.store import Store
from vaegan.utils.dtypes import resolve_dtype
from vaegan.utils.text import counted


@dataclass(frozen=True)
class RankResult:
    """What one rank did: its shards, counts and timings."""

    rank: int
    world_size: int
    device: str
    shards: int  # shards this rank encoded (not counting those already done)
    encoded: int
    errors: int
    skipped: int  # items of this rank's shards that were done before the run
    device_decoded: int  # JPEGs decoded on the device (decode_jpeg="device")
    seconds: float  # wall time of the encoding loop
    data_wait_seconds: float  # time spent waiting for the next batch
    complete: bool  # whether this rank found every shard done and wrote the final manifest


def encode_rank(job: EncodeJob, rank: Rank | None = None, progress: tqdm | SharedProgress | None = None) -> RankResult:
    """Encode this rank's shards that are not done yet, counting images into `progress` (a bar, or a share of the
    launching process's bar)."""
    rank = rank or Rank()
    progress = tqdm(disable=True) if progress is None else progress  # (a tqdm bar has no truth value)
    store = Store(job.output)
    store.make()
    source = open_source(job.input, job.shard_size, job.split, job.image_column, job.id_column, job.streaming,
                         job.max_images, job.keep_columns)
    if source.num_shards == 0:
        raise ValueError(f"{job.input}: no images to encode")
    vae = load(job.model, config=job.preset, scaling_factor=job.scaling_factor, shift_factor=job.shift_factor)
    # Image sides must split into whole latents, and FLUX.2's into whole 2x2 patches of latents.
    policy = resolution_policy(job, vae.config.downsampling_factor * LatentNormalization.of(vae).spatial_factor)
    manifest = make_manifest(job, source, vae, policy)
    claim_output(store, manifest)
    done = read_records(store)
    mine = [shard for shard in range(source.num_shards) if shard % rank.world_size == rank.rank]
    publish_committed(store, done, mine)  # a killed run may have committed some without publishing them
    pending = [shard for shard in mine if shard not in done]
    skipped = sum(done[shard]["items"] for shard in mine if shard in done)
    if source.num_items is None and len(pending) < job.num_workers:
        print(f"rank {rank.rank}: {len(pending)} source shards to read for {job.num_workers} workers; the rest "
              "idle (a stream is read one source shard per worker; load it without streaming to read it in parallel)")

    device = rank.device(job.device)
    codec = Codec(vae, device=device, dtype=job.dtype, batch_size=job.batch_size, tile_size=job.tile_size,
                  tiling=job.tiling, compile=job.compile)
    shard_schema = schema(job.store, job.latent_dtype, shard_metadata(manifest), job.keep_columns)
    encoder = BatchEncoder(codec, job, shard_schema, store)
    loader = DataLoader(
        ShardBatches(source, pending, policy, job.batch_size, job.decode_jpeg), batch_size=None,
        num_workers=job.num_workers, pin_memory=device.type == "cuda", prefetch_factor=4 if job.num_workers else None,
        multiprocessing_context=worker_start_method() if job.num_workers else None,
    )
    progress.total = None if source.num_items is None else sum(source.shard_items(shard) for shard in pending)
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
    complete = finalize(store, manifest) is not None
    return RankResult(
        rank=rank.rank, world_size=rank.world_size, device=str(device), shards=len(pending),
        encoded=encoder.encoded, errors=encoder.errors, skipped=skipped, device_decoded=encoder.device_decoded,
        seconds=time.perf_counter() - start,
        data_wait_seconds=waiting, complete=complete,
    )


@dataclass
class _InFlight:
    batch: ImageBatch
    latents: dict[str, torch.Tensor]  # storage dtype, on the host (being copied there when `ready` is set)
    ready: torch.cuda.Event | None


class BatchEncoder:
    """The main process's side: encode each batch, write its rows to its shard, commit shards as they end.

    The device runs one batch ahead of the host: batch i+1 is launched before the rows of batch i are
    converted and written, and the device-to-host copy is asynchronous, so the GPU does not wait on Parquet.
    """

    def __init__(self, codec: Codec, job: EncodeJob, shard_schema: Any, store: Store):
        self.codec, self.job, self.schema, self.store = codec, job, shard_schema, store
        self.writers: dict[int, ShardWriter] = {}
        self.generators: dict[int, torch.Generator] = {}
        self.late_errors: dict[int, list[dict]] = {}  # latents that are not finite in the storage dtype
        self.in_flight: _InFlight | None = None
        self.encoded = self.errors = self.device_decoded = 0

    def add(self, message: ImageBatch | ShardEnd) -> int:
        """Take one batch, or the end of a shard, from the loader; returns how many images it settled."""
        if isinstance(message, ShardEnd):
            written = self._write(self.in_flight)
            self.in_flight = None
            writer = self.writers.pop(message.shard, None) or ShardWriter(self.store, message.shard, self.schema)
            errors = message.errors + self.late_errors.pop(message.shard, [])
            commit_shard(self.store, writer.commit(message.items, sorted(errors, key=lambda error: error["index"])))
            self.generators.pop(message.shard, None)
            self.errors += len(message.errors)
            return written + len(message.errors)
        batch, errors, read_by_pil = message.on_device(self.codec.device)
        self.device_decoded += len(message.jpegs) - read_by_pil
        self.late_errors.setdefault(message.shard, []).extend(errors)
        self.errors += len(errors)
        launched = self._launch(batch) if len(batch) else None
        written = self._write(self.in_flight)
        self.in_flight = launched
        return written + len(errors)

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
    def _launch(self, batch: ImageBatch) -> _InFlight:
        codec, normalization = self.codec, self.codec.normalization
        posterior = codec.posterior(batch.pixels)  # (B, 3, H, W) uint8 in, on the device
        if self.job.store == "posterior":
            latents = {
                "mean": normalization.normalize(posterior.mean),
                "logvar": normalization.normalize_logvar(posterior.logvar),
            }
        elif self.job.store == "mean":
            latents = {"latent": normalization.normalize(posterior.mean)}
        else:
            # One generator per shard, seeded by the shard: a rerun draws the same samples.
            generator = self.generators.get(batch.shard)
            if generator is None:
                generator = torch.Generator(codec.device).manual_seed(self.job.seed * 1_000_003 + batch.shard)
                self.generators[batch.shard] = generator
            latents = {"latent": normalization.normalize(posterior.sample(generator))}
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
        batch = flight.batch
        finite = torch.stack([value.isfinite().flatten(1).all(1) for value in flight.latents.values()]).all(0)
        for position in (~finite).nonzero().flatten().tolist():
            self.late_errors.setdefault(batch.shard, []).append({
                "id": batch.ids[position], "index": int(batch.indices[position]), "shard": batch.shard,
                "reason": f"{batch.ids[position]}: latent not finite in {self.job.latent_dtype} (overflow or a "
                          "broken model); store fp32 or bf16",
            })
        keep = finite.nonzero().flatten()
        self.errors += len(finite) - len(keep)
        if len(keep) == 0:
            return len(finite)
        storage = STORAGE_TYPES[self.job.latent_dtype]
        pixels_height, pixels_width = batch.pixels.shape[-2:]
        columns: dict[str, Any] = {
            "id": [batch.ids[position] for position in keep.tolist()],
            "index": batch.indices[keep].numpy(),
        }
        for name, value in flight.latents.items():
            columns[name] = nested(encode_values(value[keep], self.job.latent_dtype), storage)
        channels, height, width = next(iter(flight.latents.values())).shape[1:]
        columns |= {
            "latent_shape": [[channels, height, width]] * len(keep),
            "height": np.full(len(keep), pixels_height, np.int32),
            "width": np.full(len(keep), pixels_width, np.int32),
            "source_height": batch.source_sizes[keep, 0].numpy(),
            "source_width": batch.source_sizes[keep, 1].numpy(),
            "crop_box": batch.boxes[keep].tolist(),
        }
        for name in self.job.keep_columns:
            columns[name] = [batch.extras[position].get(name) for position in keep.tolist()]
        writer = self.writers.get(batch.shard)
        if writer is None:
            writer = self.writers[batch.shard] = ShardWriter(self.store, batch.shard, self.schema)
        writer.add(columns)
        self.encoded += len(keep)
        return len(finite)


@dataclass
class EncodeSummary:
    """What one encoding call did (over all its ranks) and, when the folder is complete, its manifest."""

    output: str | Path  # the folder or URL, as given
    encoded: int  # images encoded by this call
    errors: int  # unusable inputs met by this call (errors.jsonl lists all of them, of every run)
    skipped: int  # items of shards already done before this call
    device_decoded: int  # JPEGs decoded on the device (decode_jpeg="device"); PIL read the rest
    seconds: float  # wall time of the slowest rank's encoding loop
    data_wait: float  # share of that time the encoding loops spent waiting for a batch (mean over ranks)
    manifest: dict | None  # the final manifest when every shard is done, else None
    ranks: list[RankResult] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.encoded + self.errors) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        lines = [
            f"encoded {counted(self.encoded, 'image')}, {counted(self.errors, 'error')}, {self.skipped} skipped "
            f"(already done) in {self.seconds:.1f} s: {self.images_per_second:.1f} images/s, "
            f"{100 * self.data_wait:.0f}% of the time waiting for data "
            f"({counted(len(self.ranks), 'process', 'processes')})"
        ]
        if self.device_decoded:
            lines.append(f"{self.device_decoded} JPEGs decoded on the device, "
                         f"{self.encoded + self.errors - self.device_decoded} images read by PIL")
        if self.manifest is None:
            lines.append(f"{self.output}: not complete yet (other ranks still running, or rerun to resume)")
        else:
            counts = self.manifest["counts"]
            lines.append(
                f"{self.output}: {counted(counts['encoded'], 'latent')} in {counted(counts['files'], 'shard')}, "
                f"{counts['bytes'] / 2**20:.1f} MiB; {counted(counts['errors'], 'error')} listed in errors.jsonl"
            )
        return "\n".join(lines)


def encode(job: EncodeJob) -> EncodeSummary:
    """Run an encoding job (see `EncodeJob` for the options): on this process, on `job.num_processes` processes
    started here, or as this process's rank of a torchrun launch."""
    rank = Rank.from_torchrun()
    if job.num_processes > 1 and rank.world_size > 1:
        raise ValueError("num_processes > 1 inside a torchrun launch: let torchrun start the processes")
    local_processes = max(job.num_processes, rank.local_world_size)
    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and local_processes > torch.cuda.device_count():
        raise ValueError(f"{local_processes} processes on this machine but {torch.cuda.device_count()} GPUs")
    workers = default_num_workers(local_processes) if job.num_workers is None else job.num_workers
    job = dataclasses.replace(job, device=device, num_workers=workers)
    if job.num_processes > 1:
        results = launch(encode_rank, job, job.num_processes, "img", "encoding", job.progress)
    else:
        # Closed on the way out of a failure too, so the error is printed on a line of its own.
        with tqdm(unit="img", desc="encoding", smoothing=0.1, disable=not job.progress or rank.rank > 0) as bar:
            results = [encode_rank(job, rank, bar)]
    store = Store(job.output)
    summary = EncodeSummary(
        output=job.output,
        encoded=sum(result.encoded for result in results),
        errors=sum(result.errors for result in results),
        skipped=sum(result.skipped for result in results),
        device_decoded=sum(result.device_decoded for result in results),
        seconds=max(result.seconds for result in results),
        data_wait=float(np.mean([result.data_wait_seconds / max(result.seconds, 1e-9) for result in results])),
        manifest=store.read_json(MANIFEST_NAME) if any(result.complete for result in results) else None,
        ranks=results,
    )
    if job.progress:
        print(summary)
    return summary


def encode_dataset(model: str | Path, input: str | Path, output: str | Path, **options: Any) -> EncodeSummary:
    """Encode every image of `input` with the VAE at `model` into latent shards in `output`; `options` are the
    other fields of `EncodeJob` (exactly one of crop, buckets, max_side). Rerunning the same call resumes."""
    return encode(EncodeJob(model=model, input=input, output=output, **options))
