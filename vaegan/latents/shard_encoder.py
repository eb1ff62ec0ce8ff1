"""What every encoding engine shares: the plan of a job (output, source, VAE, manifest, shards done) and the
`BatchEncoder` that turns batches of a shard into its latents, written and committed as the shard ends."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vaegan.autoencoder.codec import Codec
from vaegan.autoencoder.network import AutoencoderKL
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.formats.load import load
from vaegan.images.buckets import ResolutionPolicy
from vaegan.latents.job import EncodeJob, resolution_policy
from vaegan.latents.manifest import (
    MANIFEST_NAME,
    claim_output,
    commit_shard,
    make_manifest,
    publish_committed,
    read_records,
    shard_metadata,
)
from vaegan.latents.quantization import CALIBRATION_IMAGES, calibrate, column_maps
from vaegan.latents.shards import METADATA_KEY, ShardWriter, encode_values, schema, tensor_column
from vaegan.latents.sources import ImageBatch, ShardBatches, ShardEnd, Source, open_source
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


@dataclass
class EncodePlan:
    """What every engine settles before encoding: the output, the source, the VAE and how images are sized, the
    manifest (claimed), and the shards already done."""

    store: Store
    source: Source
    vae: AutoencoderKL
    policy: ResolutionPolicy
    manifest: dict
    done: dict[int, dict]  # progress records by shard

    @classmethod
    def of(cls, job: EncodeJob) -> EncodePlan:
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
        if job.latent_dtype == "uint8" and not store.exists(MANIFEST_NAME):
            manifest["quantization"] = calibrate_on(job, source, vae, policy)
        manifest = claim_output(store, manifest)
        return cls(store, source, vae, policy, manifest, read_records(store))

    def pending(self, shards: list[int]) -> list[int]:
        """Those of `shards` not done yet; the done ones a killed run committed without publishing are published."""
        publish_committed(self.store, self.done, shards)
        return [shard for shard in shards if shard not in self.done]

    def skipped(self, shards: list[int]) -> int:
        """Items of `shards` that were done before this run."""
        return sum(self.done[shard]["items"] for shard in shards if shard in self.done)

    def shard_schema(self, job: EncodeJob) -> Any:
        return schema(job.store, job.latent_dtype, shard_metadata(self.manifest), job.keep_columns)


@dataclass
class _InFlight:
    batch: ImageBatch
    latents: dict[str, torch.Tensor]  # storage dtype, on the host (being copied there when `ready` is set)
    ready: torch.cuda.Event | None
    finite: torch.Tensor | None = None  # (B,) bool, for uint8 latents (whose codes are always finite)
    clipped: torch.Tensor | None = None  # uint8 values of this batch clipped to their map's range


def calibrate_on(job: EncodeJob, source: Source, vae: AutoencoderKL, policy: ResolutionPolicy) -> dict:
    """The uint8 maps of a new run (`vaegan.latents.quantization`), from the source's first images, encoded as the
    run will encode them (on the job's device when this process has it, else on the CPU)."""
    device = job.device if torch.device(job.device).type != "cuda" or torch.cuda.is_available() else "cpu"
    codec = Codec(vae, device=device, dtype=job.dtype, batch_size=job.batch_size, tile_size=job.tile_size,
                  tiling=job.tiling)
    reader = ShardBatches(source, [], policy, job.batch_size)
    batches, images = [], 0
    for shard in range(source.num_shards):
        for message in reader.shard_batches(shard):
            if isinstance(message, ImageBatch) and images < CALIBRATION_IMAGES:
                batches.append(message)
                images += len(message)
        if images >= CALIBRATION_IMAGES:
            break
    return calibrate(codec, batches, job.store)


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
        self.clipped: dict[int, int] = {}  # uint8 values clipped to their map's range, per shard
        self.quantization = column_maps(shard_schema_quantization(shard_schema))
        self.in_flight: _InFlight | None = None
        self.encoded = self.errors = self.device_decoded = 0
        self.committed = 0  # shards

    def add(self, message: ImageBatch | ShardEnd) -> int:
        """Take one batch, or the end of a shard, from the loader; returns how many images it settled."""
        if isinstance(message, ShardEnd):
            written = self._write(self.in_flight)
            self.in_flight = None
            writer = self.writers.pop(message.shard, None) or ShardWriter(self.store, message.shard, self.schema)
            errors = message.errors + self.late_errors.pop(message.shard, [])
            record = writer.commit(message.items, sorted(errors, key=lambda error: error["index"]))
            if self.quantization:
                record["clipped"] = self.clipped.pop(message.shard, 0)
            commit_shard(self.store, record)
            self.generators.pop(message.shard, None)
            self.errors += len(message.errors)
            self.committed += 1
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
        finite, clipped = None, None
        if self.quantization:  # finiteness is a float's property: checked before the codes
            finite = torch.stack([value.isfinite().flatten(1).all(1) for value in latents.values()]).all(0)
            stored, clipped = {}, torch.zeros((), dtype=torch.long, device=codec.device)
            for name, value in latents.items():
                stored[name], count = self.quantization[name].quantize(torch.nan_to_num(value[finite]))
                clipped = clipped + count
            # Rows that were not finite come back as zeros: `_write` drops them by `finite`.
            stored = {name: torch.zeros((len(finite), *value.shape[1:]), dtype=value.dtype, device=value.device)
                      .index_put_((finite.nonzero().flatten(),), value) for name, value in stored.items()}
        else:
            stored = {name: value.to(resolve_dtype(self.job.latent_dtype)) for name, value in latents.items()}
        if codec.device.type != "cuda":
            return _InFlight(batch, stored, None, finite, clipped)
        host = {}
        for name, value in stored.items():
            host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host[name].copy_(value, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _InFlight(batch, host, ready, finite, clipped)

    def _write(self, flight: _InFlight | None) -> int:
        if flight is None:
            return 0
        if flight.ready is not None:
            flight.ready.synchronize()
        batch = flight.batch
        if flight.finite is None:
            finite = torch.stack([value.isfinite().flatten(1).all(1) for value in flight.latents.values()]).all(0)
        else:
            finite = flight.finite.cpu()
            self.clipped[batch.shard] = self.clipped.get(batch.shard, 0) + int(flight.clipped)
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
        pixels_height, pixels_width = batch.pixels.shape[-2:]
        columns: dict[str, Any] = {
            "id": [batch.ids[position] for position in keep.tolist()],
            "index": batch.indices[keep].numpy(),
        }
        for name, value in flight.latents.items():
            columns[name] = tensor_column(encode_values(value[keep], self.job.latent_dtype), self.job.latent_dtype)
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


def shard_progress(committed: int, total: int, errors: int, seconds: float) -> str:
    """The words beside a progress bar's images/s: "shards 3/10, 2 errors, ETA 0:01:12", the time left estimated
    from the shards (what a source of unknown length, a stream or a list of tars, still has to count by)."""
    left = seconds / committed * (total - committed) if committed else None
    eta = "" if left is None else f", ETA {datetime.timedelta(seconds=round(left))}"
    return f"shards {committed}/{total}, {counted(errors, 'error')}{eta}"


def shard_schema_quantization(shard_schema: Any) -> dict | None:
    """The uint8 maps a shard schema's metadata carries (None for float latents)."""
    return json.loads(shard_schema.metadata[METADATA_KEY]).get("quantization")
