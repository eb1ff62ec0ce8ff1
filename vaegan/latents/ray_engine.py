"""`vaegan encode --engine ray`: the same job on a Ray cluster, through Ray Data.

    CPU tasks        read a shard and decode and size its images (`ShardBatches`): one row per shard
    encoder actors   each holds the frozen codec on its device (a GPU each with device cuda); it encodes a
                     shard's batches, then writes and commits the shard (`vaegan.latents.shards`' protocol)
    this process     plans the job and claims the manifest, shows progress, and finishes the folder

Scheduling, backpressure and retries are Ray's. A task or actor that dies is retried; a shard retried after a
kill is written under a new staged name, and its record names one attempt, so each image has one readable copy.
Without RAY_ADDRESS this starts a Ray instance on this machine, on the loopback interface, and stops it at the
end; with it (or `ray start` on this node), it joins that cluster, whose nodes must reach the input, the output
and the model. Ray is an optional extra: `pip install "vaegan[ray]"`.
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from vaegan.autoencoder.codec import Codec
from vaegan.formats.load import load
from vaegan.latents.job import EncodeJob
from vaegan.latents.manifest import finalize
from vaegan.latents.shard_encoder import BatchEncoder, EncodePlan, RankResult, shard_progress
from vaegan.latents.sources import ShardBatches
from vaegan.latents.store import Store


def encode_with_ray(job: EncodeJob) -> RankResult:
    """Run the job on Ray: `job.num_processes` encoder actors on the CPU, or one per GPU of the cluster with
    device cuda."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ValueError('--engine ray needs Ray: pip install "vaegan[ray]"') from error
    plan = EncodePlan.of(job)
    pending = plan.pending(list(range(plan.source.num_shards)))
    skipped = plan.skipped(list(range(plan.source.num_shards)))
    joined = bool(os.environ.get("RAY_ADDRESS"))
    ray.init(include_dashboard=False, log_to_driver=True, **({} if joined else {"_node_ip_address": "127.0.0.1"}))
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours below says it in images and shards
        gpu = torch.device(job.device).type == "cuda"
        actors = int(ray.cluster_resources().get("GPU", 0)) if gpu else job.num_processes
        if actors < 1:
            raise ValueError("--device cuda with --engine ray, but the Ray cluster has no GPUs")
        shards = ray.data.from_items([{"shard": shard} for shard in pending], override_num_blocks=max(1, len(pending)))
        read = ReadShard(ShardBatches(plan.source, [], plan.policy, job.batch_size))
        # With GPUs the reading runs in CPU tasks, as many as the CPUs and Ray's backpressure allow. On CPUs alone
        # Ray Data fuses it into the encoder actors: CPU tasks beside CPU actors could wait forever for cores the
        # actors hold, and the pixels need not travel through the object store.
        encoded = shards.map(read, num_cpus=1).map(
            EncodeShards, fn_constructor_kwargs={"job": job, "shard_schema": plan.shard_schema(job)},
            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1,
        )
        total = None if plan.source.num_items is None else sum(plan.source.shard_items(shard) for shard in pending)
        counts = {"encoded": 0, "errors": 0, "committed": 0}
        start = time.perf_counter()
        with tqdm(total=total, unit="img", desc=f"encoding (ray, {actors} actors)", disable=not job.progress) as bar:
            for row in encoded.iter_rows() if pending else ():
                counts["encoded"] += row["encoded"]
                counts["errors"] += row["errors"]
                counts["committed"] += 1
                bar.update(row["encoded"] + row["errors"])
                bar.set_postfix_str(shard_progress(counts["committed"], len(pending), counts["errors"],
                                                   time.perf_counter() - start))
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    complete = finalize(plan.store, plan.manifest) is not None
    return RankResult(rank=0, world_size=1, device=f"ray: {actors} {'GPU' if gpu else 'CPU'} actors",
                      shards=len(pending), encoded=counts["encoded"], errors=counts["errors"], skipped=skipped,
                      device_decoded=0, seconds=seconds, data_wait_seconds=0.0, complete=complete)


class ReadShard:
    """A CPU task's work: one shard's images read, decoded and sized, as the batches an encoder actor takes."""

    def __init__(self, batches: ShardBatches):
        self.batches = batches

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        # Pickled here, between processes of this one job: Ray Data would try (and fail) to make Arrow of them.
        return {"shard": row["shard"], "messages": pickle.dumps(list(self.batches.shard_batches(int(row["shard"]))))}


class EncodeShards:
    """An encoder actor: the frozen codec on this actor's device, and the output it commits shards to."""

    def __init__(self, job: EncodeJob, shard_schema: Any):
        vae = load(job.model, config=job.preset, scaling_factor=job.scaling_factor, shift_factor=job.shift_factor)
        if torch.device(job.device).type == "cpu":
            torch.set_num_threads(1)  # one CPU per actor, as scheduled
        self.codec = Codec(vae, device=job.device, dtype=job.dtype, batch_size=job.batch_size,
                           tile_size=job.tile_size, tiling=job.tiling, compile=job.compile)
        self.job, self.shard_schema, self.store = job, shard_schema, Store(job.output)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        encoder = BatchEncoder(self.codec, self.job, self.shard_schema, self.store)
        try:
            for message in pickle.loads(row["messages"]):
                encoder.add(message)
            encoder.finish()
        finally:
            encoder.abort()
        return {"shard": row["shard"], "encoded": encoder.encoded, "errors": encoder.errors}
