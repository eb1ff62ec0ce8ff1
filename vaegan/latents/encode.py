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
from vaegan.latents.job import EncodeJob
from vaegan.latents.launcher import Rank, SharedProgress, default_num_workers, launch, worker_start_method
from vaegan.latents.manifest import MANIFEST_NAME, finalize
from vaegan.latents.ray_engine import encode_with_ray
from vaegan.latents.shard_encoder import BatchEncoder, EncodePlan, RankResult, shard_progress
from vaegan.latents.sources import ShardBatches, ShardEnd
from vaegan.latents.store import Store
from vaegan.utils.text import counted


def encode_rank(job: EncodeJob, rank: Rank | None = None, progress: tqdm | SharedProgress | None = None) -> RankResult:
    """Encode this rank's shards that are not done yet, counting images into `progress` (a bar, or a share of the
    launching process's bar)."""
    rank = rank or Rank()
    progress = tqdm(disable=True) if progress is None else progress  # (a tqdm bar has no truth value)
    plan = EncodePlan.of(job)
    source = plan.source
    mine = [shard for shard in range(source.num_shards) if shard % rank.world_size == rank.rank]
    pending, skipped = plan.pending(mine), plan.skipped(mine)
    if source.num_items is None and len(pending) < job.num_workers:
        print(f"rank {rank.rank}: {len(pending)} source shards to read for {job.num_workers} workers; the rest "
              "idle (a stream is read one source shard per worker; load it without streaming to read it in parallel)")

    device = rank.device(job.device)
    codec = Codec(plan.vae, device=device, dtype=job.dtype, batch_size=job.batch_size, tile_size=job.tile_size,
                  tiling=job.tiling, compile=job.compile)
    encoder = BatchEncoder(codec, job, plan.shard_schema(job), plan.store)
    loader = DataLoader(
        ShardBatches(source, pending, plan.policy, job.batch_size, job.decode_jpeg), batch_size=None,
        num_workers=job.num_workers, pin_memory=device.type == "cuda", prefetch_factor=4 if job.num_workers else None,
        multiprocessing_context=worker_start_method() if job.num_workers else None,
    )
    progress.total = None if source.num_items is None else sum(source.shard_items(shard) for shard in pending)
    if isinstance(progress, SharedProgress):
        progress.add_parts(total=len(pending))
    start = time.perf_counter()
    waiting, errors_before = 0.0, 0
    try:
        batches = iter(loader)
        while True:
            before = time.perf_counter()
            batch = next(batches, None)
            waiting += time.perf_counter() - before
            if batch is None:
                break
            progress.update(encoder.add(batch))
            if isinstance(batch, ShardEnd):
                if isinstance(progress, SharedProgress):
                    progress.add_parts(done=1, errors=encoder.errors - errors_before)
                    errors_before = encoder.errors
                else:
                    progress.set_postfix_str(shard_progress(encoder.committed, len(pending), encoder.errors,
                                                            time.perf_counter() - start))
        encoder.finish()
    finally:
        encoder.abort()
        progress.close()
    complete = finalize(plan.store, plan.manifest) is not None
    return RankResult(
        rank=rank.rank, world_size=rank.world_size, device=str(device), shards=len(pending),
        encoded=encoder.encoded, errors=encoder.errors, skipped=skipped, device_decoded=encoder.device_decoded,
        seconds=time.perf_counter() - start,
        data_wait_seconds=waiting, complete=complete,
    )


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

    @property
    def where(self) -> str:
        """What ran it: "2 processes", or Ray's actors."""
        if len(self.ranks) == 1 and self.ranks[0].device.startswith("ray"):
            return self.ranks[0].device
        return counted(len(self.ranks), "process", "processes")

    def __str__(self) -> str:
        lines = [
            f"encoded {counted(self.encoded, 'image')}, {counted(self.errors, 'error')}, {self.skipped} skipped "
            f"(already done) in {self.seconds:.1f} s: {self.images_per_second:.1f} images/s, "
            f"{100 * self.data_wait:.0f}% of the time waiting for data ({self.where})"
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
            quantization = self.manifest.get("quantization")
            if quantization:
                cost = quantization["cost"]
                psnr = "no change" if cost["decode_psnr_db"] is None else f"{cost['decode_psnr_db']:.1f} dB PSNR"
                lines.append(
                    f"uint8 latents: decoded, {psnr} against the exact latents' decode ({cost['images']} of the "
                    f"{quantization['calibration_images']} calibration images; latent RMSE {cost['latent_rmse']:.4f});"
                    f" {counts['clipped_values']} values clipped to the calibrated ranges"
                )
        return "\n".join(lines)


def encode(job: EncodeJob) -> EncodeSummary:
    """Run an encoding job (see `EncodeJob` for the options): on this process, on `job.num_processes` processes
    started here, as this process's rank of a torchrun launch, or on Ray (`job.engine`)."""
    rank = Rank.from_torchrun()
    if job.num_processes > 1 and rank.world_size > 1:
        raise ValueError("num_processes > 1 inside a torchrun launch: let torchrun start the processes")
    local_processes = max(job.num_processes, rank.local_world_size)
    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and job.engine == "local" and local_processes > torch.cuda.device_count():
        raise ValueError(f"{local_processes} processes on this machine but {torch.cuda.device_count()} GPUs")
    workers = default_num_workers(local_processes) if job.num_workers is None else job.num_workers
    job = dataclasses.replace(job, device=device, num_workers=workers)
    if job.engine == "ray":
        if rank.world_size > 1:
            raise ValueError("--engine ray inside a torchrun launch: run it once; Ray spreads the work")
        results = [encode_with_ray(job)]
    elif job.num_processes > 1:
        results = launch(encode_rank, job, job.num_processes, "img", "encoding", job.progress, shard_progress)
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
