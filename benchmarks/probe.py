"""Benchmark the diffusion probe's training throughput against a plain PyTorch loop of the same model.

Both sides train the same DiT (same initial weights) by flow matching on the same batches (`StepBatches`: the
batch of step k is drawn with generators seeded by (seed, k, purpose)), with AdamW, the same warm-up, gradient
clipping at 1 and the weight EMA:

- **probe**: `vaegan.probe.module.fit`, i.e. `ProbeModule` under a real `lightning.Trainer`, exactly as
  `vaegan probe` trains (validation and checkpoints pushed past the end, so only training is timed);
- **plain**: the same steps written out as a for-loop (forward, loss, backward, clip, step, schedule, EMA).

Steps are timed after a warm-up, alternating the two sides over repeats; the medians are printed side by side,
with the largest difference between the two loss trajectories (they should agree to rounding: the same
computation). The latents are random normal numbers, which costs the same as real ones.

    python benchmarks/probe.py                                  # the CPU default of `vaegan probe`
    python benchmarks/probe.py --device cuda --width 768 --depth 12 --heads 12 --batch-size 256 \\
        --latent-shape 4 32 32 --precision bf16-mixed                  # configs/probe-dit-b.yaml's scale
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from vaegan.probe.flow import flow_matching_loss, interpolate
from vaegan.probe.module import ProbeLatents, ProbeModule, StepBatches, fit


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=128, help="token width (vaegan probe's CPU default)")
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--patch-size", type=int, default=2, help="latent patch side per token")
    parser.add_argument("--latent-shape", type=int, nargs=3, default=[4, 16, 16],
                        help="C h w (the tiny f4 VAE at 64x64: 4 16 16)")
    parser.add_argument("--batch-size", type=int, default=32, help="latents per step")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of both sides")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32-true", help="Lightning precision (plain: autocast to match)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return parser.parse_args()


def make_module(args: argparse.Namespace, checkpoint: Path) -> ProbeModule:
    total = args.warmup + args.steps
    return ProbeModule(
        latent_shape=tuple(args.latent_shape), patch_size=args.patch_size, width=args.width, depth=args.depth,
        heads=args.heads, seed=0, steps=total, val_every=10 * total, checkpoint_every=10 * total,
        checkpoint_path=str(checkpoint),
    )


def data(args: argparse.Namespace) -> tuple[ProbeLatents, ProbeLatents]:
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(1024, *args.latent_shape, generator=generator)
    validation = torch.randn(8, *args.latent_shape, generator=generator)
    as_latents = lambda x: ProbeLatents(x, None, torch.zeros(len(x), dtype=torch.long),  # noqa: E731
                                        [str(i) for i in range(len(x))])
    return as_latents(train), as_latents(validation)


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.losses.append(float(outputs["loss"]))


def run_probe(args: argparse.Namespace, folder: Path) -> tuple[float, list[float]]:
    """The probe's own training path: `fit`, with a timing callback added to its Trainer."""
    train, validation = data(args)
    module = make_module(args, folder / "probe.ckpt")
    module.set_validation(validation)
    timer = StepTimer()
    fit(module, train, args.batch_size, 0.0, accelerator=args.device, precision=args.precision, grad_clip=1.0,
        progress=False, callbacks=[timer])
    return steps_per_second(timer.times, args.warmup), timer.losses


def run_plain(args: argparse.Namespace, folder: Path) -> tuple[float, list[float]]:
    """The same training as a for-loop."""
    device = torch.device(args.device)
    train, _ = data(args)
    module = make_module(args, folder / "plain.ckpt").to(device)
    model, ema = module.model, module.ema
    optimizer = torch.optim.AdamW(model.parameters(), lr=module.hparams.lr, weight_decay=0.0)
    warmup = module.hparams.lr_warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    autocast = args.precision.startswith(("bf16", "16"))
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float16
    times, losses = [], []
    model.train()
    for step, batch in enumerate(StepBatches(train, args.batch_size, 0, 0, args.warmup + args.steps)):
        x0, noise, t = (batch[key].to(device) for key in ("x0", "noise", "t"))
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = flow_matching_loss(model(interpolate(x0, noise, t), t), x0, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(module.hparams.ema_decay, (2 + step) / (11 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        losses.append(loss.item())
    return steps_per_second(times, args.warmup), losses


def steps_per_second(times: list[float], warmup: int) -> float:
    timed = times[warmup - 1:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def main() -> None:
    args = arguments()
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (the first timed step needs a start)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rates: dict[str, list[float]] = {"probe": [], "plain": []}
    losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for name, run in (("probe", run_probe), ("plain", run_plain)):
                rate, losses[name] = run(args, Path(folder) / f"{name}{repeat}")
                rates[name].append(rate)
                print(f"repeat {repeat}: {name} {rate:.2f} steps/s")
    module = make_module(args, Path("unused"))
    samples = {name: statistics.median(values) * args.batch_size for name, values in rates.items()}
    difference = max(abs(a - b) for a, b in zip(losses["probe"], losses["plain"], strict=True))
    print(f"\nDiT width {args.width}, depth {args.depth}, {args.heads} heads, patch {args.patch_size} "
          f"({module.model.num_parameters():,} parameters), latents {tuple(args.latent_shape)}, batch "
          f"{args.batch_size}, {args.device}, {args.precision}, {torch.get_num_threads()} threads")
    print("| loop | steps/s | latents/s |\n| --- | ---: | ---: |")
    for name in ("probe", "plain"):
        print(f"| {name} | {statistics.median(rates[name]):.2f} | {samples[name]:.0f} |")
    print(f"probe / plain: {samples['probe'] / samples['plain']:.2f}; largest loss difference over "
          f"{len(losses['probe'])} steps: {difference:.2e}")


if __name__ == "__main__":
    main()
