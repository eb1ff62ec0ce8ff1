"""Benchmark a tiny autoencoder against its teacher, and against diffusers' AutoencoderTiny with the same weights.

Images/s of encode and decode (median of repeats, every implementation alternated within each round after a
warm-up), and the multiply-adds per pixel of each network's convolutions. Random weights by default (speed does
not depend on training): TAESD's shape against the SD VAE; --student and --teacher take trained ones (a
distilled student and the VAE it learned from, or TAEF2 and a FLUX.2-shaped VAE). The diffusers rows need a
student diffusers can build (the classic variant).

    python benchmarks/tiny.py --sizes 256 512 --json tiny.json
    python benchmarks/tiny.py --student runs/distill-demo/student --teacher runs/demo/vae --sizes 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vaegan import AutoencoderKL, Codec, load
from vaegan.autoencoder.tiny import TinyAutoencoder, multiply_adds_per_pixel
from vaegan.formats.tiny import diffusers_config


def diffusers_twin(student: TinyAutoencoder):
    """diffusers' AutoencoderTiny holding the student's weights, or None for a variant it cannot build."""
    if not student.config.diffusers_compatible:
        return None
    from diffusers import AutoencoderTiny

    twin = AutoencoderTiny(**{k: v for k, v in diffusers_config(student.config).items() if not k.startswith("_")})
    twin.load_state_dict(student.state_dict())
    return twin.eval().requires_grad_(False)


def runners(student, teacher, twin, device: str, dtype: torch.dtype) -> dict[tuple[str, str], callable]:
    """(implementation, operation) -> a call on a batch of images (encode) or latents (decode)."""
    tiny = Codec(student, device, dtype, auto_tile_pixels=None)
    big = Codec(teacher, device, dtype, auto_tile_pixels=None)
    calls = {("student", "encode"): tiny.encode, ("student", "decode"): tiny.decode,
             ("teacher", "encode"): big.encode, ("teacher", "decode"): big.decode}
    if twin is not None:
        twin = twin.to(device=device, dtype=dtype)

        @torch.inference_mode()
        def twin_encode(x):
            return twin.encode(x.to(device, dtype)).latents.float()

        @torch.inference_mode()
        def twin_decode(z):
            return twin.decode(z.to(device, dtype)).sample.float().clamp(-1, 1)

        calls |= {("diffusers AutoencoderTiny", "encode"): twin_encode,
                  ("diffusers AutoencoderTiny", "decode"): twin_decode}
    return calls


def costs(calls, student: TinyAutoencoder, teacher: AutoencoderKL, side: int) -> dict[tuple[str, str], float]:
    """Multiply-adds per pixel of each row's network, counted once on a side^2 image (they do not depend on it)."""
    models = {"student": student, "diffusers AutoencoderTiny": student, "teacher": teacher}
    return {(impl, op): multiply_adds_per_pixel(getattr(models[impl], "encoder" if op == "encode" else "decoder"),
                                                side, student.config.downsampling_factor)
            for impl, op in calls}


def measure(calls, macs: dict[tuple[str, str], float], size: int, batch: int, repeats: int, warmup: int,
            device: str) -> list[dict]:
    images = torch.rand(batch, 3, size, size) * 2 - 1
    latents = calls[("teacher", "encode")](images)  # what a previewer decodes: the teacher's latents
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for round in range(warmup + repeats):
        for key, call in calls.items():  # alternated: a machine that drifts slows every row alike
            tick = time.perf_counter()
            call(images if key[1] == "encode" else latents)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if round >= warmup:
                times[key].append(time.perf_counter() - tick)
    return [{"impl": impl, "op": op, "size": size, "batch": batch, "images_per_s": batch / statistics.median(seconds),
             "macs_per_pixel": macs[(impl, op)]} for (impl, op), seconds in times.items()]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", help="a tiny autoencoder vaegan.load reads; default: TAESD's shape, random")
    parser.add_argument("--teacher", help="its VAE; default: the SD VAE's shape, random")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sides")
    parser.add_argument("--batch-size", type=int, default=2, help="images per call")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="precision of every model")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student = load(args.student) if args.student else TinyAutoencoder.from_preset("taesd")
    teacher = load(args.teacher) if args.teacher else AutoencoderKL.from_preset("sd")
    if not isinstance(student, TinyAutoencoder) or isinstance(teacher, TinyAutoencoder):
        parser.error("--student must be a tiny autoencoder and --teacher a KL autoencoder")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    calls = runners(student, teacher, diffusers_twin(student), args.device, dtype)
    macs = costs(calls, student, teacher, min(args.sizes))
    rows = [row for size in args.sizes
            for row in measure(calls, macs, size, args.batch_size, args.repeats, args.warmup, args.device)]
    print("| impl | op | size | images/s | vs teacher | multiply-adds/pixel |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        teacher_row = next(r for r in rows
                           if r["impl"] == "teacher" and (r["op"], r["size"]) == (row["op"], row["size"]))
        print(f"| {row['impl']} | {row['op']} | {row['size']} | {row['images_per_s']:.2f} | "
              f"{row['images_per_s'] / teacher_row['images_per_s']:.1f}x | {row['macs_per_pixel']:,.0f} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "rows": rows}, file, indent=2)
    return rows


if __name__ == "__main__":
    main()
