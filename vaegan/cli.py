"""The `vaegan` command.

`fit` and `validate` go to LightningCLI, which maps YAML configs and `--key value` flags onto the arguments of
`VAEGAN` and `ImageDataModule`. Every other command is one typed function (or, for `encode`, the `EncodeJob`
dataclass) whose signature and docstring jsonargparse turns into its options and `--help`, with `--config
FILE.yaml` and `--print_config` as for `fit`: each option is declared once, where it is used. Each command's
module is imported only when that command runs, so `vaegan eval` never imports Lightning.

Failures a user can fix (a missing or broken file, missing weights, a bad option value, a hub dataset that is
not cached offline, a run that diverged) end the command with one line on stderr and exit status 2; anything
else is a bug and keeps its traceback. `--debug` (or `VAEGAN_DEBUG=1`) shows the traceback of every failure.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.formats.card import model_card
from vaegan.formats.load import load
from vaegan.formats.save import save
from vaegan.pretrained.weights import MissingWeights

LIGHTNING_COMMANDS = ("fit", "validate")
HELP = """usage: vaegan COMMAND [--config FILE.yaml] [--option value ...]

Train:
  fit       train or fine-tune a VAE (LightningCLI): vaegan fit --config configs/demo.yaml
  validate  PSNR/SSIM/LPIPS and latent statistics of a training checkpoint or config

Use a VAE:
  export    training checkpoint -> diffusers folder or single file, normalisation measured on data
  convert   any VAE vaegan reads -> diffusers folder or single file
  info      architecture, parameters, latent shape and normalisation of a VAE
  eval      benchmark VAEs side by side: PSNR, SSIM, MS-SSIM, LPIPS, rFID, latent statistics, sheets
  encode    a dataset -> Parquet shards of latents (resumable, several processes or GPUs)
  decode    latent shards or a sampler's latents -> PNG/WebP/JPEG images
  probe     train one small diffusion transformer per VAE on its latents: how learnable is each latent space?

Options are written as in `fit`: --batch_size 8, --progress false, lists as --models+ a --models+ b or
--models '[a, b]'. Run `vaegan COMMAND --help` for the options of each. A failure prints one line and exits
with status 2; --debug (or VAEGAN_DEBUG=1) shows its traceback.
"""
# The exit status of a failure the user can fix, as for a bad option (argparse's and jsonargparse's choice).
FAILURE_STATUS = 2
DEBUG_VARIABLE = "VAEGAN_DEBUG"


class CommandFailed(Exception):
    """A failure the user can fix, raised by a command with a message for them."""


# ValueError covers bad values and files (FormatError, ImageError, CheckpointError); OSError missing files, full
# disks and datasets that are not cached offline.
EXPECTED_FAILURES = (CommandFailed, ValueError, OSError, MissingWeights)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return
    try:
        run(argv[0], argv[1:])
    except EXPECTED_FAILURES as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__  # one line, however it was written
        print(f"vaegan {argv[0]}: error: {message}", file=sys.stderr)
        raise SystemExit(FAILURE_STATUS) from None


def run(name: str, options: list[str]) -> None:
    """Parse the options of command `name` and run it."""
    if name in LIGHTNING_COMMANDS:
        run_lightning([name, *options])
        return
    from jsonargparse import CLI

    if name == "encode":
        from vaegan.latents.encode import encode
        from vaegan.latents.job import EncodeJob

        encode(CLI(EncodeJob, args=options, prog="vaegan encode"))
        return
    if name == "probe":
        from vaegan.probe.run import ProbeJob, probe

        probe(CLI(ProbeJob, args=options, prog="vaegan probe"))
        return
    CLI(command(name), args=options, prog=f"vaegan {name}")


def command(name: str) -> Callable:
    """The function behind a command (imported here, so each command loads only what it needs)."""
    if name == "convert":
        return convert
    if name == "info":
        return info
    if name == "export":
        from vaegan.train.export import export

        return export
    if name == "eval":
        from vaegan.evaluate.run import evaluate

        return evaluate
    if name == "decode":
        from vaegan.latents.decode import decode_latents

        return decode_latents
    raise CommandFailed(f"unknown command {name!r}; `vaegan --help` lists the commands")


def run_lightning(argv: list[str]) -> None:
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI

    from vaegan.formats.checkpoints import check_complete
    from vaegan.train.data import ImageDataModule
    from vaegan.train.module import VAEGAN, TrainingDiverged
    from vaegan.train.regularizer_options import migrate_flat_options

    class CLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            # LightningCLI reads a checkpoint named by --ckpt_path for its hyperparameters right after this:
            # one cut short is refused by name here rather than by the zip reader.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path and Path(ckpt_path).is_file():
                check_complete(ckpt_path)

        def _parse_ckpt_path(self) -> None:
            # LightningCLI puts the checkpoint's hyperparameters over the config here (the settings that shape
            # the networks come from the checkpoint). One written before the regulariser options were grouped
            # holds them flat: they are moved into their groups first, as in the configs of that time.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if not ckpt_path or not Path(ckpt_path).is_file():
                return
            hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {}
            hparams.pop("_instantiator", None)
            if hparams:
                hparams = migrate_flat_options(hparams, ckpt_path)
                self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    use_wandb_offline_unless_logged_in()
    # `args` is the command line on purpose (without --debug), which Lightning warns about when it runs from one.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    try:
        CLI(
            VAEGAN,
            ImageDataModule,
            args=migrate_flat_arguments(argv),
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False},
        )
    except (TrainingDiverged, MisconfigurationException) as error:
        raise CommandFailed(str(error)) from error


def migrate_flat_arguments(argv: list[str]) -> list[str]:
    """`fit`/`validate` arguments with the flat regulariser options of older configs and command lines moved into
    their groups (`--model.eq_weight 1` -> `--model.eq.weight 1`; a config file's `model: {eq_weight: 1}` is
    passed on as its migrated text), each source warned about once."""
    from vaegan.train.regularizer_options import flat_key_target, warn_flat_options

    migrated, flat = [], []
    arguments = iter(argv)
    for argument in arguments:
        option, equals, value = argument.partition("=")
        if option in ("--config", "-c"):
            path = value if equals else next(arguments, "")
            migrated += [option, migrate_config_file(path)]
            continue
        target = flat_key_target(option.removeprefix("--model.")) if option.startswith("--model.") else None
        if target:
            flat.append(option)
            option = "--model." + ".".join(target)
        migrated.append(option + equals + value if equals else option)
    if flat:
        warn_flat_options(flat, "the command line")
    return migrated


def migrate_config_file(path: str) -> str:
    """The config file `path` as given, or its text with the flat regulariser options moved into their groups."""
    import yaml

    from vaegan.train.regularizer_options import migrate_flat_options

    config_file = Path(path)
    if not config_file.is_file():
        return path  # a YAML string, or a missing file that jsonargparse names
    config = yaml.safe_load(config_file.read_text())
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return path
    migrated = migrate_flat_options(model, path)
    return path if migrated is model else yaml.safe_dump({**config, "model": migrated}, sort_keys=False)


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


def convert(
    source: str,
    destination: str,
    *,
    to: Literal["diffusers", "single-file"],
    dtype: Literal["float32", "float16", "bfloat16"] | None = None,
    preset: str | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    eval_report: str | None = None,
) -> Path:
    """Convert any VAE vaegan reads to a diffusers folder (with a model card) or a single file.

    Args:
        source: a diffusers folder, single file, training checkpoint, or a hub name owner/name.
        destination: output folder (diffusers) or .safetensors file (single-file).
        to: output format.
        dtype: store the weights in this dtype; default: as loaded (fp32).
        preset: architecture preset (sd, sdxl, sd3, flux, flux2, mini) for files that carry no config.
        scaling_factor: override the scaling factor.
        shift_factor: override the shift factor.
        subfolder: the folder of the source (or hub repository) that holds the VAE; default: the root, then vae/.
        revision: of a hub name: branch, tag or commit.
        eval_report: a `vaegan eval` output folder whose results the model card shows.
    """
    vae = load(source, config=preset, scaling_factor=scaling_factor, shift_factor=shift_factor,
               subfolder=subfolder, revision=revision)
    card = model_card(vae, Path(destination).name, eval_report) if to == "diffusers" else None
    path = save(vae, destination, format=to, dtype=getattr(torch, dtype) if dtype else None, card=card)
    print(f"wrote {to} VAE to {path}")
    return path


def info(
    path: str,
    size: tuple[int, ...] = (512,),
    format: Literal["text", "json"] = "text",
    preset: str | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
) -> dict:
    """Describe a VAE: architecture, parameters, latent shape and normalisation.

    Args:
        path: any VAE vaegan reads, or a hub name owner/name.
        size: image size for the latent shape: one side, or height and width (e.g. '[512, 768]').
        format: text for people, or JSON.
        preset: architecture preset (sd, sdxl, sd3, flux, flux2, mini) for files that carry no config.
        scaling_factor: override the scaling factor.
        shift_factor: override the shift factor.
        subfolder: the folder of the path (or hub repository) that holds the VAE; default: the root, then vae/.
        revision: of a hub name: branch, tag or commit.
    """
    vae = load(path, config=preset, scaling_factor=scaling_factor, shift_factor=shift_factor, subfolder=subfolder,
               revision=revision)
    height, width = (tuple(size) * 2)[:2]
    summary = vae_summary(vae, height, width)
    if format == "json":
        print(json.dumps(summary, indent=2))
        return summary
    config = summary["architecture"]
    print(f"{path}")
    print(f"  parameters        {summary['parameters']:,} (encoder {summary['encoder_parameters']:,}, "
          f"decoder {summary['decoder_parameters']:,})")
    print(f"  widths            {config['block_out_channels']}, {config['layers_per_block']} resnets per level, "
          f"GroupNorm({config['norm_num_groups']}), mid attention {config['mid_block_add_attention']}")
    print(f"  latent            {config['latent_channels']} channels, f{summary['downsampling_factor']}, "
          f"quant convs {config['use_quant_conv']}/{config['use_post_quant_conv']}")
    print(f"  {height}x{width} image -> latent {tuple(summary['latent_shape'])} "
          f"({summary['compression']}x fewer values)")
    print(f"  normalisation     z_model = {summary['normalization_formula']} -> "
          f"{tuple(summary['normalized_latent_shape'])}")
    return summary


def vae_summary(vae, height: int, width: int) -> dict:
    """What a user wants to know about a VAE before using it."""
    config = vae.config
    f = config.downsampling_factor
    latent = (config.latent_channels, height // f, width // f)
    normalization = LatentNormalization.of(vae)
    patch = normalization.spatial_factor
    return {
        "architecture": config.to_dict(),
        "parameters": vae.num_parameters(),
        "encoder_parameters": sum(p.numel() for p in vae.encoder.parameters()),
        "decoder_parameters": sum(p.numel() for p in vae.decoder.parameters()),
        "downsampling_factor": f,
        "image_shape": [config.in_channels, height, width],
        "latent_shape": list(latent),
        # What a diffusion model sees: FLUX.2's normalisation folds 2x2 latent pixels into channels.
        "normalized_latent_shape": [normalization.channels(latent[0]), latent[1] // patch, latent[2] // patch],
        "compression": round(config.in_channels * height * width / (latent[0] * latent[1] * latent[2]), 2),
        "normalization": normalization.to_json(),
        "normalization_formula": str(normalization),
    }


if __name__ == "__main__":
    main()
