"""Benchmark vaegan's Codec against diffusers' AutoencoderKL with the same weights.

Throughput (images/s, median of repeats, the two implementations alternated within one run after a warm-up),
an fp32 equality check, optional peak memory (on CPU a fresh subprocess per measurement, its peak RSS minus its
baseline; on CUDA max_memory_allocated above the loaded models, in this process), the seam error of tiled vs
untiled output on a real photo, and the peak memory of a 2048^2 decode. Random weights for speed and memory, which
do not depend on training; seams need a trained VAE (--model).

    python benchmarks/codec.py --arch sd --sizes 256 --repeats 3 --json bench.json
    python benchmarks/codec.py --seams --model runs/demo/vae --sizes
    python benchmarks/codec.py --arch sd --memory-2048 --sizes
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch

from vaegan import PRESETS, AutoencoderKL, Codec, load, preset
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.formats.save import diffusers_class, diffusers_config
from vaegan.utils.dtypes import resolve_dtype


def build_models(arch: str, dtype: torch.dtype, device: str, diffusers_channels_last: bool = False,
                 compile: bool = False):
    """Our VAE and diffusers' AutoencoderKL holding the same random weights; with `compile`, diffusers' encoder
    and decoder are compiled as the codec compiles ours, so that compiled rows compare like with like."""
    torch.manual_seed(0)
    ours = AutoencoderKL(preset(arch))
    theirs = diffusers_twin(ours).to(device=device, dtype=dtype)
    if diffusers_channels_last:
        theirs.to(memory_format=torch.channels_last)
    if compile:
        theirs.encoder.compile(dynamic=False)
        theirs.decoder.compile(dynamic=False)
    return ours, theirs


def diffusers_twin(ours: AutoencoderKL):
    """diffusers' AutoencoderKL (AutoencoderKLFlux2 for FLUX.2) with our VAE's architecture and weights, frozen,
    in eval mode."""
    import diffusers

    model_class = getattr(diffusers, diffusers_class(ours.config))
    theirs = model_class(**{k: v for k, v in diffusers_config(ours.config).items() if not k.startswith("_")})
    theirs.load_state_dict(ours.state_dict())
    return theirs.eval().requires_grad_(False)


def nominal_flops(ours: AutoencoderKL, size: int) -> dict[str, float]:
    """FLOPs per image of diffusers' encode and decode at size^2 (nearest-neighbour upsampling then 3x3 convs, as
    every implementation but ours computes it), counted by torch's FlopCounterMode on meta tensors: the
    denominator-free measure of how much work a VAE call is, for the fraction of a GPU's peak it achieves."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = diffusers_twin(AutoencoderKL(ours.config))
        images = torch.empty(1, 3, size, size)
        side = size // ours.config.downsampling_factor
        latents = torch.empty(1, ours.config.latent_channels, side, side)
    counts = {}
    for op, call in (("encode", lambda: twin.encode(images)), ("decode", lambda: twin.decode(latents))):
        with FlopCounterMode(display=False) as counter:
            call()
        counts[op] = float(counter.get_total_flops())
    return counts


def make_codec(ours: AutoencoderKL, args, tiled: bool) -> Codec:
    return Codec(
        ours, device=args.device, dtype=args.dtype, batch_size=args.tile_batch if tiled else args.batch_size,
        tile_size=args.tile_size if tiled else None, tile_overlap=args.tile_overlap,
        auto_tile_pixels=None, compile=args.compile, channels_last=args.channels_last,
    )


def diffusers_tiling(theirs, tile_size: int | None, overlap: int = 0):
    """Switch diffusers' tiling on with the same tile size and overlap as ours (None: off)."""
    if tile_size is None:
        theirs.disable_tiling()
        return
    theirs.enable_tiling()
    factor = 2 ** (len(theirs.config.block_out_channels) - 1)
    theirs.tile_sample_min_size = tile_size
    theirs.tile_latent_min_size = tile_size // factor
    theirs.tile_overlap_factor = overlap / tile_size


def runners(ours: AutoencoderKL, theirs, args, tiled: bool):
    """{(implementation, op): fn(input) -> output}; both take/return the same normalised tensors."""
    codec = make_codec(ours, args, tiled)
    diffusers_tiling(theirs, args.tile_size if tiled else None, args.tile_overlap)
    normalization = codec.normalization
    dtype = resolve_dtype(args.dtype)

    @torch.inference_mode()
    def diffusers_encode(x):
        mean = theirs.encode(x.to(args.device, dtype)).latent_dist.mean
        return normalization.normalize(mean.float()).to(x.device)

    return {
        ("vaegan", "encode"): codec.encode,
        ("vaegan", "decode"): codec.decode,
        ("diffusers", "encode"): diffusers_encode,
        ("diffusers", "decode"): diffusers_decoder(theirs, normalization, args.device, dtype),
    }


def diffusers_decoder(theirs, normalization: LatentNormalization, device: str, dtype: torch.dtype):
    """Normalised latents -> images in [-1, 1] through diffusers' VAE, on the latents' device (the pipelines'
    denormalisation, done by vaegan's one implementation of it, so that only the networks are compared)."""

    @torch.inference_mode()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = normalization.denormalize(latents).to(device, dtype)
        return theirs.decode(z).sample.float().clamp(-1, 1).to(latents.device)

    return decode


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def benchmark_size(ours, theirs, args, size: int, tiled: bool, profiles: list[str]) -> list[dict]:
    """Images/s of encode and decode for both implementations, alternated; plus the fp32 equality check. With
    --profile, each call's operator table is appended to `profiles`."""
    run = runners(ours, theirs, args, tiled)
    batch = args.batch_size if size <= 512 else 1
    normalization = LatentNormalization.of(ours)
    side = size // ours.config.downsampling_factor // normalization.spatial_factor
    torch.manual_seed(1)
    images = torch.rand(batch, 3, size, size) * 2 - 1
    latents = torch.randn(batch, normalization.channels(ours.config.latent_channels), side, side)
    inputs = {"encode": images, "decode": latents}
    times = {key: [] for key in run}
    outputs = {}
    peaks = {}
    for repeat in range(args.warmup + args.repeats):
        for op in ("encode", "decode"):
            # Alternate which implementation goes first so drift (thermal, neighbours) hits both alike.
            order = ("vaegan", "diffusers") if repeat % 2 == 0 else ("diffusers", "vaegan")
            for impl in order:
                synchronize(args.device)
                start = time.perf_counter()
                outputs[impl, op] = run[impl, op](inputs[op])
                synchronize(args.device)
                if repeat >= args.warmup:
                    times[impl, op].append(time.perf_counter() - start)
    if args.memory and args.device.startswith("cuda"):
        peaks = {key: cuda_peak_mib(run[key], inputs[key[1]]) for key in run}
    if args.profile:
        profiles += [operator_table(fn, inputs[op], args.device, f"{impl} {op} {size}² ×{batch} {args.dtype}")
                     for (impl, op), fn in run.items()]
    flops = nominal_flops(ours, size)
    rows = []
    for impl, op in run:
        difference = (outputs["vaegan", op] - outputs["diffusers", op]).abs().max().item()
        seconds = statistics.median(times[impl, op])
        rows.append(dict(
            impl=impl, op=op, size=size, tiled=tiled, batch=batch, dtype=args.dtype, device=args.device,
            compile=args.compile, seconds=seconds, images_per_s=batch / seconds, max_abs_diff_vs_diffusers=difference,
            nominal_flops_per_image=flops[op], achieved_tflops=flops[op] * batch / seconds / 1e12,
        ))
        if (impl, op) in peaks:
            rows[-1]["peak_mib"] = peaks[impl, op]
    return rows


def operator_table(fn, x: torch.Tensor, device: str, title: str) -> str:
    """One call under torch.profiler: its operators by self time on the device, the most expensive first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as profiler:
        fn(x)
        synchronize(device)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    return f"== {title}\n" + profiler.key_averages().table(sort_by=sort_by, row_limit=15)


def cuda_peak_mib(fn, x: torch.Tensor) -> float:
    """The most CUDA memory one call allocates above what is allocated before it (the models, the input), MiB.
    The caching allocator counts tensors, not the blocks it keeps, so this needs no fresh process."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fn(x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


# ---- peak memory in a fresh process ----

def resident_memory(field: str = "VmRSS") -> int:
    """This process's resident set size (VmRSS) or its high-water mark (VmHWM) in bytes, from /proc (Linux).

    Not `getrusage`'s ru_maxrss: a process started by fork+exec inherits its parent's peak there, so a child
    of a parent that holds two 1024^2 runs would report the parent's peak instead of its own.
    """
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_peak_memory(args) -> dict:
    """Run one op once in this (fresh) process; report its peak memory above the pre-op baseline in MiB."""
    impl, op, size, tiled = args.child.split(":")
    size, tiled = int(size), tiled == "tiled"
    ours, theirs = build_models(args.arch, resolve_dtype(args.dtype), args.device, args.diffusers_channels_last)
    # Both models stay loaded, so they are part of the baseline and only the op's own memory is counted.
    fn = runners(ours, theirs, args, tiled)[impl, op]
    normalization = LatentNormalization.of(ours)
    side = size // ours.config.downsampling_factor // normalization.spatial_factor
    x = (torch.rand(1, 3, size, size) * 2 - 1 if op == "encode"
         else torch.randn(1, normalization.channels(ours.config.latent_channels), side, side))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        # Building the models (state-dict copies, imports) peaks above what they hold afterwards: reset the
        # high-water mark to the current RSS (Linux: clear_refs 5), so that afterwards it is the op's own peak.
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        baseline = resident_memory()
    start = time.perf_counter()
    fn(x)
    synchronize(args.device)
    seconds = time.perf_counter() - start
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resident_memory("VmHWM")
    return dict(impl=impl, op=op, size=size, tiled=tiled, peak_mib=(peak - baseline) / 2**20, seconds=seconds)


def peak_memory(args, impl: str, op: str, size: int, tiled: bool) -> dict:
    """Spawn this script with --child so every measurement starts from a clean allocator."""
    command = [
        sys.executable, __file__, "--child", f"{impl}:{op}:{size}:{'tiled' if tiled else 'untiled'}",
        "--arch", args.arch, "--dtype", args.dtype, "--device", args.device, "--threads", str(args.threads),
        "--batch-size", str(args.batch_size), "--tile-size", str(args.tile_size),
        "--tile-overlap", str(args.tile_overlap), "--tile-batch", str(args.tile_batch),
    ] + {True: ["--channels-last"], False: ["--no-channels-last"], None: []}[args.channels_last]
    command += ["--diffusers-channels-last"] if args.diffusers_channels_last else []
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- seams on a real photo ----

def seam_errors(args) -> list[dict]:
    """Tiled vs untiled encode and decode of skimage's astronaut (512^2), for each overlap in --overlaps, and
    diffusers' tiled vs untiled decode with the same weights, tile size and overlap.

    Seams are only meaningful for a trained VAE (--model): with random weights the error mostly measures how
    much each tile's GroupNorm statistics differ from the whole image's.
    """
    from skimage.data import astronaut

    torch.manual_seed(0)
    vae = load(args.model) if args.model else AutoencoderKL(preset(args.arch))
    # diffusers' own tiling of the same weights, against its own untiled decode: the side-by-side reference.
    theirs = diffusers_twin(vae).to(args.device, resolve_dtype(args.dtype))
    photo = torch.from_numpy(astronaut()).permute(2, 0, 1)[None]                 # (1, 3, 512, 512) uint8
    untiled = Codec(vae, device=args.device, dtype=resolve_dtype(args.dtype), auto_tile_pixels=None)
    latents = untiled.encode(photo)
    reference = untiled.decode(latents)
    diffusers_decode = diffusers_decoder(theirs, LatentNormalization.of(vae), args.device, resolve_dtype(args.dtype))
    theirs.disable_tiling()
    diffusers_reference = diffusers_decode(latents)
    rows = []
    for overlap in args.overlaps:
        tiled = Codec(vae, device=args.device, dtype=resolve_dtype(args.dtype), batch_size=args.batch_size,
                      tile_size=args.seam_tile_size, tile_overlap=overlap)
        diffusers_tiling(theirs, args.seam_tile_size, overlap)
        for impl, op, result, target in (
            ("vaegan", "encode", tiled.encode(photo), latents),
            ("vaegan", "decode", tiled.decode(latents), reference),
            ("diffusers", "decode", diffusers_decode(latents), diffusers_reference),
        ):
            error = (result - target).abs()
            # PSNR of the difference on the images' [-1, 1] range (peak-to-peak 2), as for uint8 images;
            # for latents, on the range the untiled latents span.
            peak = 2.0 if op == "decode" else (target.max() - target.min()).item()
            mse = error.pow(2).mean().item()
            rows.append(dict(
                impl=impl, op=op, tile_size=args.seam_tile_size, overlap=overlap, max_abs=error.max().item(),
                mean_abs=error.mean().item(), psnr_db=10 * math.log10(peak**2 / mse) if mse else math.inf,
            ))
            row = rows[-1]
            print(f"seams {impl:9s} {op:6s} tile {row['tile_size']} overlap {overlap:4d}: max {row['max_abs']:.4f}"
                  f"  mean {row['mean_abs']:.4f}  PSNR {row['psnr_db']:.2f} dB", flush=True)
    return rows


def print_table(rows: list[dict]):
    print(f"{'impl':10s} {'op':7s} {'size':>5s} {'tiled':>5s} {'batch':>5s} {'img/s':>9s} {'s/call':>8s} "
          f"{'max|diff|':>10s} {'peak MiB':>9s}")
    for row in rows:
        peak = row.get("peak_mib")
        print(f"{row['impl']:10s} {row['op']:7s} {row['size']:5d} {row['tiled']!s:>5s} {row['batch']:5d} "
              f"{row['images_per_s']:9.3f} {row['seconds']:8.2f} {row['max_abs_diff_vs_diffusers']:10.2e} "
              f"{'' if peak is None else f'{peak:9.0f}'}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd", choices=list(PRESETS),
                        help="architecture preset (random weights)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 1024],
                        help="square image sizes to time; pass none to skip timing")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="precision of both models")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=4, help="images per call at sizes <= 512 (else 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median taken)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
    parser.add_argument("--tile-size", type=int, default=512, help="tile side in pixels for tiled rows")
    parser.add_argument("--tile-overlap", type=int, default=128, help="tile overlap in pixels for tiled rows")
    parser.add_argument("--tile-batch", type=int, default=1,
                        help="tiles per forward pass in tiled rows (diffusers decodes one at a time)")
    parser.add_argument("--tiled", choices=["both", "yes", "no"], default="both",
                        help="time untiled, tiled (sizes above --tile-size only) or both")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="run the codec in channels_last, or NCHW with --no-channels-last (default: the "
                             "codec's, channels_last on a CPU only)")
    parser.add_argument("--diffusers-channels-last", action="store_true",
                        help="also convert diffusers' model to channels_last (it runs NCHW as loaded)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the codec's network calls, and diffusers' encoder and decoder")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each row's peak memory (one extra call each; on CPU in a fresh subprocess)")
    parser.add_argument("--profile", help="also write each call's operators by self time (torch.profiler) here")
    parser.add_argument("--seams", action="store_true",
                        help="measure tiled-vs-untiled error on a 512^2 photo")
    parser.add_argument("--seam-tile-size", type=int, default=256, help="tile size for --seams")
    parser.add_argument("--model", default=None,
                        help="a trained VAE (any format vaegan reads) for --seams instead of random --arch weights")
    parser.add_argument("--overlaps", type=int, nargs="+", default=[0, 32, 64, 128],
                        help="tile overlaps in pixels for --seams")
    parser.add_argument("--memory-2048", action="store_true",
                        help="peak memory of a 2048^2 decode, tiled and untiled (untiled: minutes, ~15+ GB)")
    parser.add_argument("--json", help="write all results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: impl:op:size:tiled|untiled
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # cuDNN picks each convolution's fastest algorithm on its first call at a shape (the warm-up), for both
    # implementations alike: what a throughput-minded user of either sets.
    torch.backends.cudnn.benchmark = args.device.startswith("cuda")
    if args.child:
        print(json.dumps(child_peak_memory(args)))
        return
    results: dict = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "timings": []}
    profiles: list[str] = []
    if args.sizes:
        ours, theirs = build_models(args.arch, resolve_dtype(args.dtype), args.device, args.diffusers_channels_last,
                                    args.compile)
        for size in args.sizes:
            modes = {"both": [False, True], "yes": [True], "no": [False]}[args.tiled]
            for tiled in modes:
                if tiled and size <= args.tile_size:
                    continue  # one tile: identical to untiled
                rows = benchmark_size(ours, theirs, args, size, tiled, profiles)
                if args.memory and not args.device.startswith("cuda"):
                    for row in rows:
                        row["peak_mib"] = peak_memory(args, row["impl"], row["op"], size, tiled)["peak_mib"]
                results["timings"] += rows
                print_table(rows)
                sys.stdout.flush()
    if args.profile:
        with open(args.profile, "w") as file:
            file.write("\n\n".join(profiles) + "\n")
    if args.seams:
        results["seams"] = seam_errors(args)
    if args.memory_2048:
        results["memory_2048"] = []
        for tiled in (True, False):
            row = peak_memory(args, "vaegan", "decode", 2048, tiled)
            results["memory_2048"].append(row)
            mode = "tiled" if tiled else "untiled"
            print(f"2048^2 decode ({args.arch}, {mode}): peak {row['peak_mib']:.0f} MiB above baseline, "
                  f"{row['seconds']:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
