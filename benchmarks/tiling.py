"""Exact tiled decode (vaegan.autoencoder.exact_tiling) beside the untiled decode, today's independent tiles
and diffusers' tiling.

Each measurement runs in a fresh process that loads the model, decodes once untimed when --warmup asks, then
times one decode: wall time, peak memory above the loaded model (the high-water mark reset after loading,
Linux), and the image, from which PSNR against the untiled decode is computed. Rounds alternate the
implementations, so drift (thermal, neighbours) hits all alike; times and memory are medians over rounds.
Random weights by default, with random latents; a trained VAE (--model) decodes the latents of a real photo.

    python benchmarks/tiling.py --arch sd --size 512 --tile 192 --repeats 3
    python benchmarks/tiling.py --model runs/demo/vae --size 1024 --tile 512 --repeats 3
    python benchmarks/tiling.py --arch sd --size 2048 --tile 128 --repeats 5 --budgets 1.5/fp16 \\
        --impls untiled exact
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from codec import diffusers_tiling, diffusers_twin, operator_table, resident_memory

from vaegan import AutoencoderKL, Codec, load, preset
from vaegan.autoencoder.exact_tiling import ExactTiling, decoder_graph
from vaegan.utils.dtypes import resolve_dtype

IMPLEMENTATIONS = ("untiled", "exact", "independent", "diffusers")


def build_vae(args) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = load(args.model) if args.model else AutoencoderKL(preset(args.arch))
    return vae.eval().requires_grad_(False)


def random_latents(vae: AutoencoderKL, size: int) -> torch.Tensor:
    """Seeded random raw latents (1, C, size/f, size/f)."""
    factor = vae.config.downsampling_factor
    torch.manual_seed(1)
    return torch.randn(1, vae.config.latent_channels, size // factor, size // factor)


def photo_latents(vae: AutoencoderKL, size: int) -> torch.Tensor:
    """The posterior mean of skimage's astronaut resized to size x size, encoded untiled."""
    from skimage.data import astronaut
    from skimage.transform import resize

    image = resize(astronaut(), (size, size), anti_aliasing=True)                     # (size, size, 3) in [0, 1]
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None] * 2 - 1
    with torch.inference_mode():
        return vae.encode(x).mean


def decoder(vae: AutoencoderKL, impl: str, args, budget: int | None, stash_dtype: torch.dtype | None, runs: list):
    """fn(raw latents) -> images (B, 3, H, W), for one implementation; the exact one leaves its
    `ExactTiling` in `runs`."""
    config, tile = vae.config, args.tile // vae.config.downsampling_factor
    if impl == "diffusers":
        theirs = diffusers_twin(vae)
        diffusers_tiling(theirs, args.tile, args.overlap)
        return lambda z: theirs.decode(z).sample
    vae.to(memory_format=torch.channels_last)  # as the codec runs it
    if impl == "untiled":
        return lambda z: vae.decode(z.contiguous(memory_format=torch.channels_last))
    if impl == "exact":
        def exact(z):
            run = ExactTiling(decoder_graph(vae), z, tile, stash_budget=budget, stash_dtype=stash_dtype)
            runs[:] = [run]
            return run.run()
        return exact
    codec = Codec(vae, batch_size=1, tile_size=args.tile, tile_overlap=args.overlap, auto_tile_pixels=None,
                  tiling="blend")
    shift = config.shift_factor or 0.0
    return lambda z: codec.decode((z - shift) * config.scaling_factor)


def child(args):
    """Time one decode in this fresh process; print JSON and save the image for the parent."""
    impl, _, stashes = args.child.partition(":")
    budget_gib, _, stash_dtype = stashes.partition("/")
    budget = None if budget_gib in ("", "none") else int(float(budget_gib) * 2**30)
    vae = build_vae(args)
    runs = []
    decode = decoder(vae, impl, args, budget, resolve_dtype(stash_dtype) if stash_dtype else None, runs)
    z = torch.load(args.latents)
    with torch.inference_mode():
        for _ in range(args.warmup):
            decode(z)
        # Loading peaks above what the model holds afterwards: reset the high-water mark to the current RSS
        # (Linux: clear_refs 5), so that it measures the decode alone.
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        baseline = resident_memory()
        start, start_cpu = time.perf_counter(), time.process_time()
        image = decode(z).float().clamp(-1, 1)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = resident_memory("VmHWM") - baseline
    if args.profile_output:  # one more decode, after the measurements, so that the profiler stays out of them
        with torch.inference_mode():
            Path(args.profile_output).write_text(operator_table(decode, z, "cpu", args.child) + "\n")
    torch.save(image, args.output)
    result = dict(seconds=seconds, cpu_seconds=cpu_seconds, peak_mib=peak / 2**20)
    if runs:  # what the plan promised: multiply-adds against the untiled network's, and the stashes' peak
        result.update(macs_vs_untiled=runs[0].plan.macs / runs[0].untiled_macs(),
                      peak_stash_mib=runs[0].peak_stash_bytes / 2**20)
    print(json.dumps(result))


def measure(args, row: str, latents: Path, output: Path, profile: Path | None = None) -> dict:
    command = [
        sys.executable, __file__, "--child", row, "--latents", str(latents), "--output", str(output),
        "--arch", args.arch, "--size", str(args.size), "--tile", str(args.tile), "--overlap", str(args.overlap),
        "--threads", str(args.threads), "--warmup", str(args.warmup),
    ] + (["--model", args.model] if args.model else []) + (["--profile-output", str(profile)] if profile else [])
    # On a shared machine, OpenMP threads that spin while they wait for a busy core make every small op cost
    # many times its work; waiting passively keeps the rows comparable (all run alike).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{row} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of the difference on the images' [-1, 1] range (peak-to-peak 2)."""
    mse = (image - reference).pow(2).mean().item()
    return 10 * math.log10(4.0 / mse) if mse else math.inf


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd", choices=["sd", "sdxl", "sd3", "flux", "mini"],
                        help="architecture preset (random weights) when --model is not given")
    parser.add_argument("--model", default=None, help="a trained VAE (any format vaegan reads)")
    parser.add_argument("--size", type=int, default=512, help="side of the decoded square image in pixels")
    parser.add_argument("--tile", type=int, default=192, help="tile side in pixels (a multiple of the factor)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="overlap of independent and diffusers tiles in pixels (default: a quarter tile)")
    parser.add_argument("--budgets", nargs="+", default=["none"],
                        help="stash budgets of the exact rows in GiB, 'none' for unlimited, each optionally with "
                             "the stashes' dtype after a slash (1.5/fp16); one row each")
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                        help="implementations to measure (untiled is always measured: it is the reference)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each row runs once per round")
    parser.add_argument("--warmup", type=int, default=0, help="untimed decodes in each process before the timed one")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--profile",
                        help="also run one more decode per row under torch.profiler (in the first round's process, "
                             "after the timed one) and write each row's operators by CPU time to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)    # internal: impl[:budget GiB[/stash dtype]]
    parser.add_argument("--latents", help=argparse.SUPPRESS)  # internal: latents file for the child
    parser.add_argument("--output", help=argparse.SUPPRESS)   # internal: where the child saves its image
    parser.add_argument("--profile-output", help=argparse.SUPPRESS)  # internal: where the child writes its profile
    args = parser.parse_args(argv)
    args.overlap = args.tile // 4 if args.overlap is None else args.overlap
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    rows = ["untiled"] + [f"exact:{budget}" for budget in args.budgets if "exact" in args.impls]
    rows += [impl for impl in ("independent", "diffusers") if impl in args.impls]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        vae = build_vae(args)
        z = photo_latents(vae, args.size) if args.model else random_latents(vae, args.size)
        torch.save(z, folder / "latents.pt")
        del vae
        results = {row: [] for row in rows}
        def row_file(row, suffix=".pt"):
            return folder / f"{row.replace('/', '-')}{suffix}"

        for repeat in range(args.repeats):
            # Alternate the order of the rows from round to round.
            for row in rows if repeat % 2 == 0 else rows[::-1]:
                profile = row_file(row, ".profile.txt") if args.profile and repeat == 0 else None
                results[row].append(measure(args, row, folder / "latents.pt", row_file(row), profile))
                last = results[row][-1]
                print(f"round {repeat}: {row:14s} {last['seconds']:8.2f} s {last['cpu_seconds']:8.2f} s CPU "
                      f"{last['peak_mib']:8.0f} MiB", flush=True)
        if args.profile:
            Path(args.profile).write_text("".join(row_file(row, ".profile.txt").read_text() for row in rows))
        reference = torch.load(folder / "untiled.pt")
        table = []
        def median(row, key):
            return statistics.median(r[key] for r in results[row])

        for row in rows:
            table.append(dict(
                row=row, size=args.size, tile=args.tile, seconds=median(row, "seconds"),
                vs_untiled=median(row, "seconds") / median("untiled", "seconds"),
                cpu_seconds=median(row, "cpu_seconds"),
                cpu_vs_untiled=median(row, "cpu_seconds") / median("untiled", "cpu_seconds"),
                peak_mib=median(row, "peak_mib"),
                psnr_db=psnr(torch.load(row_file(row)), reference),
                rounds=results[row],
            ))
    name = args.model or f"random {args.arch}"
    print(f"\n{name}, {args.size}^2 decode, {args.tile}-px tiles ({args.overlap}-px overlap for independent and "
          f"diffusers tiles), fp32, CPU, {args.threads} threads, median of {args.repeats}")
    print(f"{'row':14s} {'s':>8s} {'x untiled':>9s} {'CPU s':>8s} {'x untiled':>9s} {'peak MiB':>9s} "
          f"{'PSNR dB':>8s} {'MACs x':>7s} {'stash MiB':>9s}")
    for row in table:
        plan = row["rounds"][0]
        macs, stash = plan.get("macs_vs_untiled"), plan.get("peak_stash_mib")
        print(f"{row['row']:14s} {row['seconds']:8.2f} {row['vs_untiled']:9.2f} {row['cpu_seconds']:8.2f} "
              f"{row['cpu_vs_untiled']:9.2f} {row['peak_mib']:9.0f} {row['psnr_db']:8.2f} "
              f"{'' if macs is None else f'{macs:7.2f}'} {'' if stash is None else f'{stash:9.0f}'}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(args=vars(args), rows=table), file, indent=2)


if __name__ == "__main__":
    main()
