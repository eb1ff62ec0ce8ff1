"""The `vaegan` command: `fit` and `validate` through LightningCLI; `convert`, `info` and `export` for VAEs."""

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


if __name__ == "__main__":
    main()
