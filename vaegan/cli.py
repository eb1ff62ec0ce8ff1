"""The `vaegan` command: `fit` and `validate` through LightningCLI; `convert`, `info`, `export` and `eval` for
VAEs; `encode` and `decode` for datasets of latents."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

LIGHTNING_COMMANDS = ("fit", "validate")
HELP = """usage: vaegan COMMAND ...

Train:
  fit       train or fine-tune a VAE (LightningCLI): vaegan fit --config configs/demo.yaml [--key value ...]
  validate  PSNR/SSIM/LPIPS and latent statistics of a training checkpoint or config

Use a VAE:
  export    training checkpoint -> diffusers folder or single file, with factors measured on data
  convert   any VAE vaegan reads -> diffusers folder or single file
  info      architecture, parameters, latent shape and factors of a VAE
  eval      benchmark VAEs side by side: PSNR, SSIM, MS-SSIM, LPIPS, rFID, latent statistics, sheets
  encode    a dataset -> Parquet shards of latents (resumable, several processes or GPUs)
  decode    latent shards or a sampler's latents -> PNG/WebP/JPEG images

Run `vaegan COMMAND --help` for the options of each.
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return
    if argv[0] in LIGHTNING_COMMANDS:
        run_lightning(argv)
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    args.func(args)


def run_lightning(argv: list[str]) -> None:
    """LightningCLI maps YAML configs and `--key value` flags onto VAEGAN's and ImageDataModule's arguments."""
    from lightning.pytorch.cli import LightningCLI

    from vaegan.data import ImageDataModule
    from vaegan.module import VAEGAN

    use_wandb_offline_unless_logged_in()
    LightningCLI(
        VAEGAN,
        ImageDataModule,
        args=argv,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


# The run length is VAEGAN's `max_batches` (Lightning's step counter counts each of the two optimizers).
# Loggers and checkpointing are set in each config (configs/*.yaml), where they can be read and changed.
TRAINER_DEFAULTS = {"max_steps": -1, "max_epochs": -1}


def use_wandb_offline_unless_logged_in() -> None:
    """Weights & Biases logs offline unless the user has logged in or chosen a mode (no prompt, no hang)."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaegan", description="Train and ship KL autoencoders.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a VAE to a diffusers folder or a single file")
    convert.add_argument("src", help="any VAE vaegan reads: diffusers folder, single file, training checkpoint")
    convert.add_argument("dst", help="output folder (diffusers) or .safetensors file (single-file)")
    convert.add_argument("--to", choices=["diffusers", "single-file"], required=True, help="output format")
    _add_load_options(convert)
    convert.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                         help="store weights in this dtype (default: as loaded)")
    convert.set_defaults(func=convert_command)

    info = commands.add_parser("info", help="describe a VAE")
    info.add_argument("path", help="any VAE vaegan reads")
    info.add_argument("--size", type=int, nargs="+", default=[512], metavar="PIXELS",
                      help="image size (one side, or height width) for the latent shape (default: 512)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_load_options(info)
    info.set_defaults(func=info_command)

    export = commands.add_parser("export", help="training checkpoint -> inference VAE with measured factors")
    export.add_argument("checkpoint", help="a vaegan training checkpoint (.ckpt)")
    export.add_argument("output", help="output folder (diffusers) or .safetensors file (single-file)")
    export.add_argument("--format", choices=["diffusers", "single-file"], default="diffusers", help="output format")
    export.add_argument("--weights", choices=["ema", "model"], default="ema",
                        help="the EMA weights (default) or the raw trained weights")
    export.add_argument("--data", default=None,
                        help="images to measure scaling/shift factors on (a folder or a datasets source; "
                             "default: the photos bundled with scikit-image)")
    export.add_argument("--convention", choices=["shift", "scale"], default="shift",
                        help="'shift' (SD3/Flux): factors give zero mean, unit std; 'scale' (SD/SDXL): shift 0")
    export.add_argument("--resolution", type=int, default=256, help="centre-crop size for measuring (default: 256)")
    export.add_argument("--max-images", type=int, default=512, help="images used to measure (default: 512)")
    export.add_argument("--keep-factors", action="store_true",
                        help="keep the checkpoint's factors instead of measuring them")
    export.set_defaults(func=export_command)

    _add_eval_parser(commands)
    add_encode_arguments(commands.add_parser(
        "encode", help="encode a dataset into latent shards", description=ENCODE_DESCRIPTION))
    add_decode_arguments(commands.add_parser(
        "decode", help="decode latent shards to images", description=DECODE_DESCRIPTION))
    return parser


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="preset name (sd, sdxl, sd3, flux, tiny) for files that carry no config")
    parser.add_argument("--scaling-factor", type=float, default=None, help="override the scaling factor")
    parser.add_argument("--shift-factor", type=float, default=None, help="override the shift factor")


def _load(path: str, args):
    from vaegan.formats import load

    return load(path, config=args.config,
                scaling_factor=args.scaling_factor, shift_factor=args.shift_factor)


def convert_command(args) -> None:
    import torch

    vae = _load(args.src, args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    path = vae.save(args.dst, format=args.to, dtype=dtype)
    print(f"wrote {args.to} VAE to {path}")


def describe(vae, size: tuple[int, int]) -> dict:
    """What a user wants to know about a VAE before using it."""
    config = vae.config
    f = config.downsampling_factor
    height, width = size
    return {
        "architecture": config.to_dict(),
        "parameters": vae.num_parameters(),
        "encoder_parameters": sum(p.numel() for p in vae.encoder.parameters()),
        "decoder_parameters": sum(p.numel() for p in vae.decoder.parameters()),
        "downsampling_factor": f,
        "image_shape": [config.in_channels, height, width],
        "latent_shape": [config.latent_channels, height // f, width // f],
        "compression": round(
            config.in_channels * height * width / (config.latent_channels * (height // f) * (width // f)), 2
        ),
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
    }


def info_command(args) -> None:
    vae = _load(args.path, args)
    height, width = (args.size * 2)[:2]
    summary = describe(vae, (height, width))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    config = summary["architecture"]
    print(f"{args.path}")
    print(f"  parameters        {summary['parameters']:,} (encoder {summary['encoder_parameters']:,}, "
          f"decoder {summary['decoder_parameters']:,})")
    print(f"  widths            {config['block_out_channels']}, {config['layers_per_block']} resnets per level, "
          f"GroupNorm({config['norm_num_groups']}), mid attention {config['mid_block_add_attention']}")
    print(f"  latent            {config['latent_channels']} channels, f{summary['downsampling_factor']}, "
          f"quant convs {config['use_quant_conv']}/{config['use_post_quant_conv']}")
    print(f"  {height}x{width} image -> latent {tuple(summary['latent_shape'])} "
          f"({summary['compression']}x fewer values)")
    print(f"  factors           z_model = (z - {summary['shift_factor']}) * {summary['scaling_factor']}")


def export_command(args) -> None:
    from vaegan.export import export

    path = export(
        args.checkpoint, args.output, format=args.format, weights=args.weights, data=args.data,
        convention=args.convention, resolution=args.resolution, max_images=args.max_images,
        measure=not args.keep_factors,
    )
    print(f"exported {args.weights} weights to {path}")


def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="reconstruction benchmark of one or more VAEs",
        description="Reconstruct every image with every VAE (shorter side resized, centre crop, posterior mean, "
                    "uint8) and write per_image.csv, summary.json, results.md, per_image.png and sheets/ to OUTPUT.",
    )
    evaluate.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH",
                          help="a VAE in any format vaegan reads; repeat for more (the first picks the worst "
                               "images for the sheets); LABEL names it in the report (default: file or folder name)")
    evaluate.add_argument("--data", required=True,
                          help="images: a folder (recursively) or a datasets source (imagefolder:PATH, a "
                               "save_to_disk folder, a hub name)")
    evaluate.add_argument("--output", required=True, help="folder for the report files")
    evaluate.add_argument("--resolution", type=int, default=256, help="square crop side (default: 256)")
    evaluate.add_argument("--max-images", type=int, default=None, help="only the first N images (default: all)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    evaluate.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    evaluate.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                          help="precision of the VAEs, and of the latent in bits/px (default: fp32); metric "
                               "networks always run in fp32")
    evaluate.add_argument("--lpips", nargs="+", choices=["alex", "vgg", "squeeze", "none"], default=["alex"],
                          help="LPIPS backbones (default: alex, the usual evaluation metric; vgg needs "
                               "vgg16_features.safetensors in $VAEGAN_WEIGHTS_DIR); a missing one stops the run "
                               "before any work; 'none' skips LPIPS")
    evaluate.add_argument("--inception-weights", default=None, metavar="FILE",
                          help="Inception-v3 weights for rFID (safetensors; default: "
                               "$VAEGAN_WEIGHTS_DIR/inception_v3_features.safetensors, else rFID is skipped)")
    evaluate.add_argument("--inception-variant", choices=["auto", "pytorch-fid", "torchvision"], default="auto",
                          help="which Inception the weights belong to (default: auto, from the classifier's size)")
    evaluate.add_argument("--no-rfid", action="store_true", help="do not compute rFID")
    evaluate.add_argument("--sheets", type=int, default=6,
                          help="images with a comparison sheet: half evenly spaced, half the worst by the first "
                               "model's PSNR (default: 6)")
    evaluate.add_argument("--split", default="train", help="split of a datasets source (default: train)")
    evaluate.add_argument("--image-column", default="image", help="image column of a datasets source")
    evaluate.add_argument("--num-workers", type=int, default=2, help="image decoding processes (default: 2)")
    evaluate.add_argument("--config", default=None,
                          help="preset name (sd, sdxl, sd3, flux, tiny) for model files that carry no config")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=eval_command)


def eval_command(args) -> None:
    from vaegan.evaluation import evaluate
    from vaegan.report import markdown_table, write_report

    lpips = () if "none" in args.lpips else tuple(dict.fromkeys(args.lpips))
    result = evaluate(
        args.model, args.data, resolution=args.resolution, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size, max_images=args.max_images, lpips=lpips, rfid=not args.no_rfid,
        inception_weights=args.inception_weights, inception_variant=args.inception_variant, sheets=args.sheets,
        split=args.split, image_column=args.image_column, num_workers=args.num_workers, config=args.config,
        progress=not args.no_progress,
    )
    paths = write_report(result, args.output)
    print(markdown_table(result))
    for note in (result.ms_ssim_note, result.rfid_note):
        if note:
            print(note)
    if result.skipped:
        print(f"{len(result.skipped)} unreadable images skipped (listed in summary.json)")
    print(f"wrote {len(paths)} files to {args.output} (results.md, summary.json, per_image.csv, per_image.png, "
          f"sheets/) in {result.seconds:.0f} s")


ENCODE_DESCRIPTION = """Encode every image of a folder or a datasets source with a frozen VAE into Parquet shards that
datasets.load_dataset("parquet", data_dir=OUTPUT) reads: one row per image with its id, latent (posterior mean and
log-variance by default, normalised), latent shape, size and crop box; manifest.json and errors.jsonl beside them.
Rerun the same command to resume after an interruption; run several processes with --num-processes N or torchrun.
Choose a resolution policy: --crop SIZE, --buckets SIZE or --max-side SIZE."""

DECODE_DESCRIPTION = """Decode latents back to images: a vaegan encode folder or shard (images named by id, in
subfolders as the ids have them), or a tensor file of normalised latents from a diffusion sampler."""


def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `vaegan encode` (also scripts/encode_dataset.py)."""
    parser.add_argument("--model", required=True,
                        help="any VAE vaegan reads: diffusers folder, single file, training checkpoint")
    parser.add_argument("--input", required=True,
                        help="an image folder (recursive), imagefolder:/webdataset:/parquet:/arrow:PATH, a "
                             "save_to_disk folder, a local dataset folder or a hub name")
    parser.add_argument("--output", required=True, help="folder for the shards; the same folder resumes")
    policy = parser.add_mutually_exclusive_group(required=True)
    policy.add_argument("--crop", type=int, metavar="SIZE",
                        help="shorter side resized to SIZE, centre square crop (DiT, SD 1.x)")
    policy.add_argument("--buckets", type=int, metavar="SIZE",
                        help="aspect-ratio buckets of about SIZE^2 pixels, no distortion (SDXL, SD3, Flux)")
    policy.add_argument("--max-side", type=int, metavar="SIZE",
                        help="the image as it is, longer side capped at SIZE, sides cut to multiples of --step")
    parser.add_argument("--step", type=int, default=None,
                        help="bucket/max-side sides are multiples of this (default: 64 for buckets, SDXL's; the "
                             "VAE's downsampling factor for max-side)")
    parser.add_argument("--max-aspect", type=float, default=4.0, help="most elongated bucket (default: 4, i.e. 4:1)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="images with a shorter side below this are errors (default: half of SIZE for crop "
                             "and buckets, the step for max-side)")
    parser.add_argument("--split", default="train", help="split of a datasets source (default: train)")
    parser.add_argument("--image-column", default="image",
                        help="image column of a datasets source (webdataset names it by extension, e.g. jpg)")
    parser.add_argument("--id-column", default=None,
                        help="column whose value is the row's id (e.g. __key__ for webdataset; default: row index)")
    parser.add_argument("--streaming", action="store_true",
                        help="stream a datasets source instead of downloading it; one worker per source file")
    parser.add_argument("--store", choices=["posterior", "mean", "sample"], default="posterior",
                        help="posterior: mean and logvar, training resamples (default); mean or sample: half the size")
    parser.add_argument("--latent-dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                        help="stored precision (default: fp16; bf16 is stored as uint16 bits)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="precision the VAE runs in (default: fp32)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda (one GPU per process) or cuda:N (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="images per shard (default: 1000; streams keep one shard per source file)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="image-decoding processes per encoding process (default: free cores, at most 8)")
    parser.add_argument("--num-processes", type=int, default=1,
                        help="encoding processes on this machine, one GPU each with --device cuda (default: 1; "
                             "under torchrun leave it at 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --store sample's draws (default: 0)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="encode in tiles of this many pixels (default: only images above 1024^2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (one graph per shape)")
    _add_load_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=encode_command)


def encode_command(args) -> None:
    from vaegan.encoding import encode_dataset

    summary = encode_dataset(
        args.model, args.input, args.output, crop=args.crop, buckets=args.buckets, max_side=args.max_side,
        step=args.step, max_aspect=args.max_aspect, min_size=args.min_size, split=args.split,
        image_column=args.image_column, id_column=args.id_column, streaming=args.streaming, store=args.store,
        latent_dtype=args.latent_dtype, dtype=args.dtype, device=args.device, batch_size=args.batch_size,
        shard_size=args.shard_size, num_workers=args.num_workers, num_processes=args.num_processes,
        seed=args.seed, tile_size=args.tile_size, compile=args.compile, config=args.config,
        scaling_factor=args.scaling_factor, shift_factor=args.shift_factor, progress=not args.no_progress,
    )
    print(summary.describe())


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `vaegan decode` (also scripts/decode_latents.py)."""
    parser.add_argument("--input", required=True,
                        help="a vaegan encode folder or shard file, or a .pt/.pth/.npy/.safetensors file of "
                             "normalised latents (B, C, h, w)")
    parser.add_argument("--output", required=True, help="folder for the images")
    parser.add_argument("--model", default=None,
                        help="any VAE vaegan reads (default: the one the manifest names, if it is still there)")
    parser.add_argument("--format", choices=["png", "webp", "jpeg"], default="png", help="image format (default: png)")
    parser.add_argument("--quality", type=int, default=95,
                        help="webp/jpeg quality; webp at 100 is lossless (default: 95)")
    parser.add_argument("--sample", action="store_true",
                        help="decode a sample of the stored posterior instead of its mean")
    parser.add_argument("--ids", nargs="+", default=None, help="decode only these ids")
    parser.add_argument("--limit", type=int, default=None, help="decode only the first N latents")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="precision of the decoder (default: fp32)")
    parser.add_argument("--batch-size", type=int, default=4, help="latents (or tiles) per forward pass (default: 4)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="decode in tiles of this many pixels (default: only images above 1024^2)")
    parser.add_argument("--config", default=None,
                        help="preset name (sd, sdxl, sd3, flux, tiny) for model files that carry no config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=decode_command)


def decode_command(args) -> None:
    from vaegan.latents import decode_latents

    paths = decode_latents(
        args.input, args.output, args.model, format=args.format, quality=args.quality, sample=args.sample,
        ids=args.ids, limit=args.limit, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        tile_size=args.tile_size, config=args.config, progress=not args.no_progress,
    )
    print(f"wrote {len(paths)} images to {args.output}")


if __name__ == "__main__":
    main()
