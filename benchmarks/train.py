"""Benchmark training throughput of vaegan's `VAEGAN` module against a plain loop of the original recipe.

Both sides train the same architecture from the same initial autoencoder weights on the same batches, one
generator and one discriminator step per batch (`disc_start=0`, so the discriminator trains from batch 0):

- **vaegan**: the `VAEGAN` LightningModule driven by a real `lightning.Trainer`, with the module's own
  defaults (GroupNorm PatchGAN, learnable log-variance, gradient clipping, EMA), in the requested precision,
  optionally compiled and channels_last. Batches are timed after the warm-up by a Callback.
- **reference**: the latent-diffusion recipe (CompVis `contperceptual.py`) as a plain PyTorch loop:
  `diffusers.AutoencoderKL`, fp32, Adam(0.5, 0.9), L1 + LPIPS with sums per image, hinge loss, adaptive
  weight, BatchNorm PatchGAN.

Each row runs in a fresh subprocess of this script, so that its peak memory is its own (on CPU the peak RSS
of a process never goes down, and memory freed by an earlier run stays mapped).

Both use `vaegan.pretrained.lpips.PerceptualLoss` as the LPIPS network (the same computation as `lpips.LPIPS`, built
offline), so the perceptual cost is identical. Training batches are random crops of *synthetic* random images
(enough for timing); quality is checked as PSNR after the same number of steps on a fixed held-out batch of
real photos (scikit-image's astronaut and coffee), so that speed is not bought with quality.

    VAEGAN_WEIGHTS_DIR=/work/shared/assets/lpips \
        python benchmarks/train.py --arch mini --resolution 64 --batch-size 4 --steps 6 --warmup 2
    # the cost of each diffusability regulariser per batch, against the plain objective
    python benchmarks/train.py --arch mini --resolution 64 --batch-size 8 --regularizers eq se noise align
    python benchmarks/train.py --device cuda --arch sd --resolution 256 --batch-size 8 \
        --precision 32 bf16-mixed --compile --channels-last --json train_bench.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from vaegan.autoencoder.network import PRESETS
from vaegan.formats.save import diffusers_config
from vaegan.images.convert import to_uint8
from vaegan.metrics.reconstruction import psnr
from vaegan.pretrained.lpips import PerceptualLoss
from vaegan.train.discriminator import PatchDiscriminator
from vaegan.train.losses import adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from vaegan.train.module import VAEGAN

LEARNING_RATE = 1e-4  # the ldm base lr 4.5e-6 scaled by a typical batch; the same on both sides
KL_WEIGHT_LDM = 1e-6  # ldm's weight, on its per-image sums
DISC_WEIGHT = 0.5


# ---------------------------------------------------------------- data


def synthetic_batches(count: int, batch_size: int, resolution: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` batches (B, 3, R, R) in [-1, 1]: random crops of a pool of smooth random images, seeded."""
    generator = torch.Generator().manual_seed(seed)
    size = 2 * resolution
    # Low-resolution noise upsampled: blobs and edges at several scales, closer to images than white noise.
    coarse = torch.rand(16, 3, size // 8, size // 8, generator=generator)
    pool = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    pool = (pool + 0.1 * torch.randn(pool.shape, generator=generator)).clamp(0, 1) * 2 - 1  # (16, 3, 2R, 2R)
    batches = []
    for _ in range(count):
        crops = []
        for _ in range(batch_size):
            index = int(torch.randint(len(pool), (1,), generator=generator))
            top, left = torch.randint(size - resolution + 1, (2,), generator=generator).tolist()
            crops.append(pool[index, :, top : top + resolution, left : left + resolution])
        batches.append(torch.stack(crops))
    return batches


def held_out_photos(resolution: int) -> torch.Tensor:
    """Astronaut and coffee, short side resized to `resolution`, centre-cropped: (2, 3, R, R) in [-1, 1]."""
    from skimage import data

    images = []
    for photo in (data.astronaut(), data.coffee()):
        image = torch.from_numpy(photo).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1  # (1, 3, H, W)
        scale = resolution / min(image.shape[-2:])
        height, width = round(image.shape[-2] * scale), round(image.shape[-1] * scale)
        image = F.interpolate(image, (height, width), mode="bicubic", antialias=True, align_corners=False)
        top, left = (height - resolution) // 2, (width - resolution) // 2
        images.append(image[0, :, top : top + resolution, left : left + resolution].clamp(-1, 1))
    return torch.stack(images)


# ---------------------------------------------------------------- measurement helpers


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one run in MiB: CUDA `max_memory_allocated` above the allocation at `start`, else the
    growth of the process's peak RSS (`resource.getrusage`), which is process-wide: model, optimizer states,
    activations and anything else this process allocates during the run.

    On CUDA the peak is taken after the warm-up (`warmed_up`): while cuDNN tries its algorithms for each shape
    (`cudnn.benchmark`) it borrows workspaces as large as the free memory, which the steady state never needs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline_mib = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mib = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.baseline_mib = _peak_rss_mib()

    def warmed_up(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> float:
        """Peak above the baseline at `start`, MiB."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline_mib
        return _peak_rss_mib() - self.baseline_mib


def _peak_rss_mib() -> float:
    """The process's peak resident set size so far, MiB (getrusage reports KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BatchTimer(L.Callback):
    """Wall-clock time from the end of the last warm-up batch to the end of the last batch; the peak memory
    after the warm-up."""

    def __init__(self, warmup: int, device: torch.device, memory: PeakMemory):
        self.warmup = warmup
        self.device = device
        self.memory = memory
        self.start: float | None = None
        self.end: float | None = None
        self.timed_batches = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if self.warmup == 0:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        if batch_idx + 1 == self.warmup:
            self.memory.warmed_up()
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.end = now
            self.timed_batches += 1


@torch.no_grad()
def reconstruction_psnr(encode_decode, photos: torch.Tensor) -> float:
    """Mean PSNR (dB) of the posterior-mean reconstruction of `photos`, computed in fp32."""
    reconstructions = encode_decode(photos).float().clamp(-1, 1)
    return psnr(to_uint8(photos), to_uint8(reconstructions)).mean().item()


# ---------------------------------------------------------------- vaegan


# Each regulariser switched on at full weight from the first batch. EQ-VAE is applied on every batch here
# (`eq.probability` 1), so its row is the cost of a batch that has it; at the paper's p = 0.5 it averages half.
REGULARIZERS: dict[str, dict] = {
    "eq": {"weight": 1.0, "probability": 1.0},
    "se": {"weight": 1.0},
    "noise": {"weight": 1.0},
    "align": {"weight": 0.1},
}


def build_module(args, regularizer: str | None = None) -> VAEGAN:
    """The `VAEGAN` module under test, seeded so every variant starts from the same weights."""
    torch.manual_seed(0)
    options = {regularizer: dict(REGULARIZERS[regularizer])} if regularizer else {}
    if regularizer == "align":
        options["align"]["backbone"] = args.align_backbone
    return VAEGAN(
        arch=args.arch,
        perceptual_net=args.perceptual_net,
        disc_start=0,
        lr=LEARNING_RATE,
        max_batches=args.warmup + args.steps,
        channels_last=args.channels_last,
        compile=args.compile,
        **options,
    )


def run_vaegan(args, precision: str, batches: list[torch.Tensor], photos: torch.Tensor,
               regularizer: str | None = None) -> dict:
    """Train `VAEGAN` with a Lightning Trainer; return throughput, peak memory and PSNR after training."""
    device = torch.device(args.device)
    module = build_module(args, regularizer)
    memory = PeakMemory(device)
    timer = BatchTimer(args.warmup, device, memory)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        max_steps=-1,  # the module stops itself after `max_batches`
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    memory.start()
    trainer.fit(module, loader)
    peak = memory.peak()
    if timer.start is None or timer.end is None:
        raise RuntimeError(f"vaegan ran {int(module.batches_seen)} batches; none was timed after the warm-up")

    # The trained weights, not the EMA: the EMA lags behind after few steps and the reference has none.
    vae = module.vae.to(device).eval()
    quality = reconstruction_psnr(lambda x: vae.decode(vae.encode(x).mode()), photos.to(device))
    return {
        "images_per_sec": timer.timed_batches * args.batch_size / (timer.end - timer.start),
        "peak_mib": peak,
        "psnr": quality,
    }


# ---------------------------------------------------------------- the reference recipe


def build_reference(module: VAEGAN, device: torch.device):
    """diffusers' AutoencoderKL with the module's initial weights, and the recipe's BatchNorm PatchGAN."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    config = module.vae.config
    vae = DiffusersAutoencoderKL(**{k: v for k, v in diffusers_config(config).items() if not k.startswith("_")})
    vae.load_state_dict(module.vae.state_dict())
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(in_channels=config.out_channels, norm="batch")
    return vae.to(device).train(), discriminator.to(device).train()


def reference_step(vae, discriminator, perceptual, opt_g, opt_d, images: torch.Tensor) -> None:
    """One generator and one discriminator step of the latent-diffusion loss, as released (sums per image)."""
    batch_size = images.shape[0]
    # Generator. As in ldm, its backward also fills the discriminator's .grad; opt_d.zero_grad clears it.
    posterior = vae.encode(images).latent_dist
    reconstructions = vae.decode(posterior.sample()).sample
    rec = (images - reconstructions).abs() + perceptual(images, reconstructions).view(-1, 1, 1, 1)
    nll = rec.sum() / batch_size  # logvar fixed at 0: ldm never hands it to an optimizer
    kl = posterior.kl().sum() / batch_size
    g_loss = hinge_g_loss(discriminator(reconstructions))
    weight = DISC_WEIGHT * adaptive_gan_weight(nll, g_loss, vae.decoder.conv_out.weight)
    opt_g.zero_grad(set_to_none=True)
    (nll + KL_WEIGHT_LDM * kl + weight * g_loss).backward()
    opt_g.step()

    # Discriminator, on detached reconstructions.
    d_loss = hinge_d_loss(discriminator(images), discriminator(reconstructions.detach()))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()


def run_reference(args, batches: list[torch.Tensor], photos: torch.Tensor) -> dict:
    """Train the reference loop in fp32; return throughput, peak memory and PSNR after training."""
    device = torch.device(args.device)
    vae, discriminator = build_reference(build_module(args), device)
    perceptual = PerceptualLoss(net=args.perceptual_net).to(device)
    opt_g = torch.optim.Adam(vae.parameters(), lr=LEARNING_RATE, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=LEARNING_RATE, betas=(0.5, 0.9))

    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    for index, images in enumerate(batches):
        reference_step(vae, discriminator, perceptual, opt_g, opt_d, images.to(device))
        if index + 1 == args.warmup:
            memory.warmed_up()
            start = time.perf_counter()
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = memory.peak()

    vae.eval()
    quality = reconstruction_psnr(
        lambda x: vae.decode(vae.encode(x).latent_dist.mode()).sample, photos.to(device)
    )
    return {"images_per_sec": args.steps * args.batch_size / elapsed, "peak_mib": peak, "psnr": quality}


# ---------------------------------------------------------------- report


def initial_psnr(args, photos: torch.Tensor) -> float:
    """PSNR of the common initial weights, for scale: what training moved each side away from."""
    vae = build_module(args).vae.eval()
    return reconstruction_psnr(lambda x: vae.decode(vae.encode(x).mode()), photos)


def print_regularizer_costs(rows: list[dict], batch_size: int) -> None:
    """Milliseconds per batch of each regulariser's row against the plain vaegan row of the same precision."""
    plain = {row["precision"]: row for row in rows if row.get("precision") and not row.get("regularizer")}
    print(f"\n{'regulariser':<12} {'precision':<11} {'ms/batch':>9} {'plain ms':>9} {'cost':>9}")
    for row in rows:
        if not row.get("regularizer"):
            continue
        base = plain[row["precision"]]
        ms, base_ms = (1000 * batch_size / r["images_per_sec"] for r in (row, base))
        print(f"{row['regularizer']:<12} {row['precision']:<11} {ms:>9.0f} {base_ms:>9.0f} "
              f"{100 * (ms / base_ms - 1):>+8.0f}%")


def print_table(rows: list[dict], steps: int) -> None:
    """One line per implementation x settings."""
    reference_speed = rows[0]["images_per_sec"]
    header = f"{'implementation':<12} {'settings':<34} {'images/s':>9} {'peak MiB':>9} " \
             f"{f'PSNR@{steps}':>9} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        row["speedup"] = row["images_per_sec"] / reference_speed
        print(
            f"{row['implementation']:<12} {row['settings']:<34} {row['images_per_sec']:>9.2f} "
            f"{row['peak_mib']:>9.0f} {row['psnr']:>9.2f} {row['speedup']:>8.2f}x"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train")
    parser.add_argument("--arch", choices=list(PRESETS), default="mini", help="autoencoder preset")
    parser.add_argument("--resolution", type=int, default=256, help="training crop size in pixels")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch")
    parser.add_argument("--steps", type=int, default=20, help="timed batches after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (allocator, compile)")
    parser.add_argument("--precision", nargs="+", choices=["32", "bf16-mixed"], default=["32"],
                        help="Lightning precision(s) of the vaegan runs, one row each (reference: fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile vaegan's networks")
    parser.add_argument("--channels-last", action="store_true", help="run vaegan in channels_last")
    parser.add_argument("--perceptual-net", choices=["vgg", "alex", "squeeze"], default="squeeze",
                        help="LPIPS backbone of both sides (weights from $VAEGAN_WEIGHTS_DIR)")
    parser.add_argument("--regularizers", nargs="+", choices=list(REGULARIZERS), default=[],
                        help="also time vaegan with each of these diffusability regularisers on, one row each")
    parser.add_argument("--align-backbone", default="alexnet",
                        help="vision model of the align row (its weights from $VAEGAN_WEIGHTS_DIR)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--row", help="internal: run only this row ('reference', a precision, or "
                                          "precision+regulariser) ...")
    parser.add_argument("--row-output", type=Path, help="internal: ... and write its result here as JSON")
    return parser.parse_args()


def run_row(args) -> None:
    """Child process: train one row and write its measurements to `--row-output`."""
    # cuDNN picks each convolution's fastest algorithm during the warm-up, on both sides alike.
    torch.backends.cudnn.benchmark = args.device == "cuda"
    batches = synthetic_batches(args.warmup + args.steps, args.batch_size, args.resolution)
    photos = held_out_photos(args.resolution)
    if args.row == "reference":
        result = run_reference(args, batches, photos)
    else:
        precision, _, regularizer = args.row.partition("+")
        result = run_vaegan(args, precision, batches, photos, regularizer or None)
    args.row_output.write_text(json.dumps(result))


def measure_in_subprocess(row: str, output: Path) -> dict:
    """Run one row in a fresh interpreter (its own peak memory), with this run's flags."""
    command = [sys.executable, __file__, *sys.argv[1:], "--row", row, "--row-output", str(output)]
    subprocess.run(command, check=True)
    return json.loads(output.read_text())


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be at least 1 and --warmup at least 0")
    if args.row is not None:
        run_row(args)
        return

    start_psnr = initial_psnr(args, held_out_photos(args.resolution))
    options = ["compile"] * args.compile + ["channels_last"] * args.channels_last
    rows = [{"implementation": "reference", "settings": "fp32, diffusers, BatchNorm D"}]
    rows += [{"implementation": "vaegan", "settings": ", ".join([p, *options]), "precision": p}
             for p in args.precision]
    rows += [{"implementation": "vaegan", "settings": ", ".join([p, *options, f"+ {r}"]), "precision": p,
              "regularizer": r} for p in args.precision for r in args.regularizers]
    with tempfile.TemporaryDirectory() as directory:
        for index, row in enumerate(rows):
            output = Path(directory) / f"row{index}.json"
            key = "+".join(filter(None, [row.get("precision", "reference"), row.get("regularizer")]))
            row.update(measure_in_subprocess(key, output))

    print(f"\narch {args.arch}, {args.resolution}px, batch {args.batch_size}, {args.device}, "
          f"{args.warmup} warm-up + {args.steps} timed batches, one G and one D step each")
    print_table(rows, args.warmup + args.steps)
    if args.regularizers:
        print_regularizer_costs(rows, args.batch_size)
    notes = [
        "training batches: random crops of synthetic random images (timing only)",
        f"PSNR: posterior mean on astronaut + coffee centre crops after {args.warmup + args.steps} "
        f"batches; {start_psnr:.2f} dB at the common initial weights",
        f"LPIPS-{args.perceptual_net}: vaegan.pretrained.lpips.PerceptualLoss on both sides "
        "(identical perceptual cost)",
        "vaegan runs its defaults: GroupNorm D, learnable logvar, grad clipping, EMA "
        "(PSNR of the raw weights)",
        "peak MiB: CUDA max_memory_allocated after the warm-up (cuDNN's algorithm search excluded); on CPU "
        "the peak RSS growth of the row's own process (process-wide)",
    ]
    if args.regularizers:
        notes.append("regulariser rows: weight 1 (align: 0.1 x adaptive, backbone "
                     f"{args.align_backbone}) from batch 0; eq on every batch (eq.probability 1)")
    for note in notes:
        print(f"  - {note}")
    if args.json:
        config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "rows": rows, "notes": notes}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
