"""What one `vaegan encode` run is: its options, declared once as the fields of `EncodeJob`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vaegan.autoencoder.codec import Tiling
from vaegan.images.buckets import DEFAULT_MAX_ASPECT, ResolutionPolicy
from vaegan.latents.shards import (
    DEFAULT_SHARD_SIZE,
    STORAGE_TYPES,
    STORES,
)


@dataclass(frozen=True, kw_only=True)
class EncodeJob:
    """Encode every image of a folder or a datasets source into Parquet shards of latents, exactly once.

    The shards are what datasets.load_dataset("parquet", data_dir=OUTPUT) reads: one row per image with its id,
    latent (by default the normalised posterior mean and log-variance), latent shape, size and crop box;
    manifest.json and errors.jsonl beside them. Rerun the same command to resume after an interruption. Choose
    one resolution policy: crop, buckets or max_side.

    Args:
        model: any VAE vaegan reads: diffusers folder, single file, training checkpoint.
        input: an image folder (recursive), local or at a URL (s3://, gs://, hf://, file://); WebDataset tars or
            Parquet files of image bytes, local or at a URL, as a file, a glob or a brace pattern
            (shards/{00000..01023}.tar, data/*.parquet), each file one shard, streamed;
            imagefolder:/webdataset:/parquet:/arrow:PATH for `datasets`' builders, a save_to_disk folder, a local
            dataset folder or a hub name.
        output: folder for the shards, local or at a URL; the same folder resumes.
        crop: shorter side resized to this, centre square crop (DiT, SD 1.x).
        buckets: aspect-ratio buckets of about this squared pixels, no distortion (SDXL, SD3, Flux).
        max_side: the image as it is, longer side capped at this, sides cut to multiples of step.
        step: bucket/max-side sides are multiples of this; default: 64 for buckets (SDXL's), the VAE's
            downsampling factor for max-side.
        max_aspect: most elongated bucket (4: 4:1).
        min_size: images with a shorter side below this are errors; default: half the size for crop and buckets,
            the step for max-side.
        split: split of a datasets source.
        image_column: image column of a datasets source or Parquet files (webdataset names it by extension,
            e.g. jpg); for tars, the image member's extension (default: the first of jpg, jpeg, png, webp).
        id_column: column whose value is the row's id (e.g. __key__ for webdataset); default: the row index (for
            tars: the sample's key; for Parquet files: FILE/ROW).
        keep_columns: side columns carried into each row as text, for tars and Parquet files: tar members by
            extension (txt, json, cls), Parquet columns by name.
        streaming: stream a datasets source instead of downloading it; one worker per source file.
        max_images: only the first N images (in the source's sorted order), as for eval and export; a rerun must
            give the same N (not with streaming).
        store: posterior: mean and logvar, so training can resample; mean or sample: half the size.
        latent_dtype: stored precision: fp16 (half of fp32's bytes; its 2^-11 relative rounding is far below what
            the VAE reconstructs), bf16 (stored as uint16 bits), fp32, or uint8 (a quarter of fp32's bytes: one
            affine map per channel, calibrated on the first images; its cost in decode PSNR is measured and
            printed; see `vaegan.latents.quantization`).
        dtype: precision the VAE runs in (fp32: highest precision; bf16 on recent GPUs).
        device: cpu, cuda (one GPU per process) or cuda:N; default: cuda when available.
        batch_size: images per forward pass (batches hold one shape: bucket tails are smaller).
        shard_size: images per shard (streams keep one shard per source file).
        num_workers: image-decoding processes per encoding process; default: the free cores, at most 8.
        decode_jpeg: where JPEGs are decoded: workers (PIL, beside everything else) or device (torchvision's
            decode_jpeg on the encoding device, batched, nvjpeg on CUDA: for when the workers cannot keep up with a
            GPU; the workers then only read headers and plan crops). Other files, CMYK JPEGs and JPEGs the device
            refuses are read by PIL, image by image; pixels agree with PIL's within a level or two.
        engine: local: this machine's processes (and torchrun's); ray: a Ray cluster through Ray Data, joined by
            RAY_ADDRESS or started on this machine (`vaegan.latents.ray_engine`; pip install "vaegan[ray]").
        num_processes: encoding processes on this machine, one GPU each with device cuda (with engine ray: encoder
            actors on the CPU; on GPUs, one per GPU of the cluster); under torchrun leave it
            at 1 (each launched process is one rank).
        seed: seeds the draws of store=sample, per shard, so reruns draw the same.
        tile_size: encode in tiles of this many pixels; default: only images above 1024^2.
        tiling: exact tiles encode what the untiled encoder would; blend is faster and approximate.
        compile: torch.compile the encoder (one graph per shape).
        preset: architecture preset (sd, sdxl, sd3, flux, flux2, mini) for model files that carry no config.
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
    keep_columns: tuple[str, ...] = ()
    streaming: bool = False
    max_images: int | None = None
    store: Literal["posterior", "mean", "sample"] = "posterior"
    latent_dtype: Literal["fp16", "bf16", "fp32", "uint8"] = "fp16"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str | None = None
    batch_size: int = 16
    shard_size: int = DEFAULT_SHARD_SIZE
    num_workers: int | None = None
    decode_jpeg: Literal["workers", "device"] = "workers"
    engine: Literal["local", "ray"] = "local"
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
            raise ValueError("choose exactly one resolution policy: --crop SIZE, --buckets SIZE or --max_side SIZE "
                             "(in Python: crop=, buckets= or max_side=)")
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
