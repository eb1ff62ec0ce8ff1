"""Benchmark dataset encoding end to end: `vaegan encode` against a plain loop over diffusers' AutoencoderKL.

Both encode the same image files with the same weights, at the same batch size, precision and device, in one
run: read, decode, resize and centre-crop each image, encode, keep the posterior (mean and log-variance in fp16).
The plain loop is what a script without vaegan does: one process, load an image, then encode, then the next
batch, and one torch.save at the end. vaegan decodes in DataLoader workers while the model runs, and writes
Parquet shards. Reported per pipeline: images/s end to end (model loading included), images/s of the encoding
loop alone, and the share of the loop spent waiting for data (for the plain loop: the time spent loading
images, since nothing else can happen meanwhile). The latents of the two are compared as well.

`--decode-jpeg both` adds a row for `vaegan encode --decode_jpeg device`, in the same alternated rounds: the
workers only read JPEG headers and the encoding process decodes the batch on its device (nvjpeg on CUDA). Its
decoding time counts as encoding, not as waiting for data; compare the img/s.

`--source tars` packs the images into WebDataset tars of `--shard-size` first (what large sets ship as): vaegan
reads them by brace pattern, one shard per tar, and the plain loop streams them with `tarfile`. `--ray` adds a
row for `vaegan encode --engine ray` on a Ray instance started on this machine (its start-up counts end to end,
not in the loop), with `--ray-actors` encoder actors.

    python benchmarks/encode.py --arch mini --images ../shared/assets/bsds500/train --max-images 48
    python benchmarks/encode.py --source tars --ray --max-images 1000 --shard-size 100 --repeats 3
    python benchmarks/encode.py --arch sd --resolution 256 --device cuda --dtype bf16 --max-images 2000 \\
        --num-workers 8 --decode-jpeg both --json bench.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from codec import synchronize

import vaegan
from vaegan.images.crops import resize_center_crop
from vaegan.images.readers import list_image_files
from vaegan.images.reading import load_image, to_tensor
from vaegan.latents.dataset import LatentDataset
from vaegan.latents.encode import encode_dataset
from vaegan.latents.launcher import default_num_workers
from vaegan.utils.dtypes import resolve_dtype

DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "bsds500" / "train"


def plain_loop(model_dir: Path, files: list[Path], args, out: Path) -> dict:
    """The reference: diffusers' AutoencoderKL in one process, data loading and encoding taking turns; `files`
    are images, or tars whose images it reads in order (with `--source tars`)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    start = time.perf_counter()
    dtype = resolve_dtype(args.dtype)
    vae = DiffusersAutoencoderKL.from_pretrained(model_dir, torch_dtype=dtype).to(args.device)
    vae = vae.eval().requires_grad_(False)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    loop_start = time.perf_counter()
    loading = 0.0
    means, logvars = [], []
    items = tar_images(files) if args.source == "tars" else iter(files)
    while True:
        before = time.perf_counter()
        batch = list(itertools.islice(items, args.batch_size))
        if not batch:
            break
        crops = [resize_center_crop(load_image(item), args.resolution)[0] for item in batch]
        x = torch.stack([to_tensor(crop) for crop in crops])                       # (B, 3, R, R) in [-1, 1]
        loading += time.perf_counter() - before
        with torch.inference_mode():
            posterior = vae.encode(x.to(args.device, dtype)).latent_dist
            means.append(((posterior.mean.float() - shift) * scale).half().cpu())
            logvars.append(posterior.logvar.float().half().cpu())
    torch.save({"mean": torch.cat(means), "logvar": torch.cat(logvars)}, out)
    synchronize(args.device)
    end = time.perf_counter()
    return {
        "pipeline": "plain diffusers loop", "images": sum(len(mean) for mean in means), "seconds": end - start,
        "loop_seconds": end - loop_start, "data_wait": loading / (end - loop_start), "mean": torch.cat(means).float(),
    }


def tar_images(tars: list[Path]):
    """The image bytes of WebDataset tars, in order, streamed."""
    for path in tars:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                yield tar.extractfile(member).read()


PIPELINES = {"workers": "vaegan encode", "device": "vaegan, device JPEGs", "ray": "vaegan encode, ray"}


def vaegan_encode(model_dir: Path, source: str, args, out: Path, mode: str = "workers") -> dict:
    start = time.perf_counter()
    engine = {"engine": "ray", "num_processes": args.ray_actors} if mode == "ray" else {}
    summary = encode_dataset(
        model_dir, source, out, crop=args.resolution, batch_size=args.batch_size, num_workers=args.num_workers,
        device=args.device, dtype=args.dtype, latent_dtype="fp16", shard_size=args.shard_size, progress=False,
        decode_jpeg="workers" if mode == "ray" else mode, **engine,
    )
    synchronize(args.device)
    end = time.perf_counter()
    dataset = LatentDataset(out, sample=False)
    order = np.argsort(dataset.ids)  # numbered names and keys: the order the plain loop follows too
    mean = torch.stack([dataset[int(i)]["latent"] for i in order])
    return {
        "pipeline": PIPELINES[mode], "images": summary.encoded, "seconds": end - start,
        "loop_seconds": summary.seconds, "data_wait": summary.data_wait, "device_decoded": summary.device_decoded,
        "mean": mean,
    }


def link_folder(files: list[Path], folder: Path) -> Path:
    """A folder of symbolic links to `files`, numbered in their order (a file may come more than once)."""
    folder.mkdir()
    for index, path in enumerate(files):
        os.symlink(path.resolve(), folder / f"{index:07d}-{path.name}")
    return folder


def pack_tars(files: list[Path], folder: Path, size: int) -> list[Path]:
    """`files` in WebDataset tars of `size` samples, keyed by their number."""
    folder.mkdir()
    tars = []
    for first in range(0, len(files), size):
        tars.append(folder / f"{len(tars):06d}.tar")
        with tarfile.open(tars[-1], "w") as tar:
            for index, path in enumerate(files[first:first + size], start=first):
                tar.add(path.resolve(), arcname=f"{index:07d}{path.suffix.lower()}")
    return tars


def print_table(rows: list[dict], args) -> None:
    print(f"\n{args.model or args.arch} at {args.resolution}^2, batch {args.batch_size}, {args.dtype} on "
          f"{args.device}, {args.threads} torch threads, vaegan with {args.num_workers} data workers, from "
          f"{'tars of ' + str(args.shard_size) if args.source == 'tars' else 'a folder'}"
          f"{f', ray with {args.ray_actors} actors' if args.ray else ''}")
    print(f"{'pipeline':22s} {'images':>6s} {'end to end s':>12s} {'img/s':>7s} {'loop img/s':>10s} {'data wait':>9s}")
    for row in rows:
        print(f"{row['pipeline']:22s} {row['images']:6d} {row['seconds']:12.2f} "
              f"{row['images'] / row['seconds']:7.2f} {row['images'] / row['loop_seconds']:10.2f} "
              f"{100 * row['data_wait']:8.1f}%")
    for row in rows:
        if row.get("device_decoded"):
            print(f"{row['pipeline']}: {row['device_decoded']} of {row['images']} images decoded on the device")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mini", choices=list(vaegan.PRESETS),
                        help="architecture preset with random weights (default: tiny); ignored with --model")
    parser.add_argument("--model", default=None, help="a VAE vaegan reads, instead of random weights")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of images (default: BSDS500 train)")
    parser.add_argument("--max-images", type=int, default=48,
                        help="the first N images of the folder, cycling through it again if it holds fewer: a GPU "
                             "encodes a small folder in less time than its data workers take to start (default: 48)")
    parser.add_argument("--resolution", type=int, default=256, help="centre-crop size (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="precision of both models")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n] (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of the encoding process")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="vaegan's data-loading processes (default: vaegan's, the free cores up to 8)")
    parser.add_argument("--shard-size", type=int, default=1000, help="vaegan's images per shard (default: 1000)")
    parser.add_argument("--decode-jpeg", default="workers", choices=["workers", "device", "both"],
                        help="where vaegan decodes JPEGs: in its data workers, on the encoding device, or a row for "
                             "each (default: workers)")
    parser.add_argument("--source", default="folder", choices=["folder", "tars"],
                        help="read the images from a folder, or from WebDataset tars of --shard-size (default: folder)")
    parser.add_argument("--ray", action="store_true", help="add a row for vaegan encode --engine ray")
    parser.add_argument("--ray-actors", type=int, default=1, help="Ray's encoder actors (default: 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each pipeline, rotating which goes first; medians reported (default: 1)")
    parser.add_argument("--json", help="write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.num_workers is None:
        args.num_workers = default_num_workers(1)
    torch.set_num_threads(args.threads)
    files = list_image_files(Path(args.images))
    if not files:
        raise SystemExit(f"{args.images}: no images")
    files = [files[index % len(files)] for index in range(args.max_images)]
    with tempfile.TemporaryDirectory(prefix="benchmark_encode_") as scratch:
        scratch = Path(scratch)
        folder = link_folder(files, scratch / "images")  # exactly the chosen files, for both pipelines
        warm_folder = link_folder(files[:args.batch_size], scratch / "warm-images")
        files = sorted(folder.iterdir())
        source, warm_source = str(folder), str(warm_folder)
        if args.source == "tars":
            tars = pack_tars(files, scratch / "tars", args.shard_size)
            warm = pack_tars(files[:args.batch_size], scratch / "warm-tars", args.shard_size)
            source = f"{scratch}/tars/{{000000..{len(tars) - 1:06d}}}.tar"
            warm_source, files = str(warm[0]), tars
        torch.manual_seed(0)
        vae = vaegan.load(args.model) if args.model else vaegan.AutoencoderKL(vaegan.preset(args.arch))
        # diffusers reads this folder too: both sides run the same weights.
        model_dir = vaegan.save(vae, scratch / "vae", format="diffusers")
        # Warm-up (allocator, oneDNN kernels, CUDA context, file cache) outside the timings, for both.
        modes = ["workers", "device"] if args.decode_jpeg == "both" else [args.decode_jpeg]
        modes += ["ray"] if args.ray else []
        plain_loop(model_dir, files[:1] if args.source == "tars" else files[:args.batch_size], args,
                   scratch / "warm.pt")
        for mode in modes:
            vaegan_encode(model_dir, warm_source, args, scratch / f"warm-{mode}", mode)
        names = ["plain", *modes]
        runs: dict[str, list[dict]] = {"plain diffusers loop": [], **{PIPELINES[mode]: [] for mode in modes}}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # each goes first in turn
                if name == "plain":
                    result = plain_loop(model_dir, files, args, scratch / f"plain{repeat}.pt")
                else:
                    result = vaegan_encode(model_dir, source, args, scratch / f"vaegan-{name}{repeat}", name)
                runs[result["pipeline"]].append(result)
        rows = []
        for pipeline, results in runs.items():
            median = {key: statistics.median(result[key] for result in results)
                      for key in ("seconds", "loop_seconds", "data_wait")}
            rows.append({"pipeline": pipeline, "images": results[0]["images"], **median})
            if "device_decoded" in results[0]:
                rows[-1]["device_decoded"] = results[0]["device_decoded"]
        means = {pipeline: results[0]["mean"] for pipeline, results in runs.items()}
        plain = means.pop("plain diffusers loop")
        differences = {pipeline: (plain - mean).abs().max().item() for pipeline, mean in means.items()}
        if {"workers", "device"} <= set(modes):
            workers, device = means[PIPELINES["workers"]], means[PIPELINES["device"]]
            differences["device vs workers"] = (workers - device).abs().max().item()
    print_table(rows, args)
    for pipeline, difference in differences.items():
        against = "" if pipeline == "device vs workers" else "plain loop vs "
        print(f"max |difference| of the stored posterior means (fp16), {against}{pipeline}: {difference:.2e}")
    if args.json:
        report = {"args": vars(args), "results": rows, "max_abs_diff": differences}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
