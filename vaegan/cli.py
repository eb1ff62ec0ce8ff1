"""The `vaegan` command.

This module is the command table: which function runs each command. `fit` and `validate` go to LightningCLI
(`vaegan.train.command`), which maps YAML configs and `--key value` flags onto the arguments of `VAEGAN` and
`ImageDataModule`. Every other command is one typed function (or, for `encode`, the `EncodeJob`
dataclass) whose signature and docstring jsonargparse turns into its options and `--help`, with `--config
FILE.yaml` and `--print_config` as for `fit`: each option is declared once, where it is used. Each command's
module is imported only when that command runs, so `vaegan eval` never imports Lightning.

Failures a user can fix (a missing or broken file, missing weights, a bad option value, a hub dataset that is
not cached offline, a run that diverged) end the command with one line on stderr and exit status 2; anything
else is a bug and keeps its traceback. `--debug` (or `VAEGAN_DEBUG=1`) shows the traceback of every failure.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

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
    except BrokenPipeError:
        # The reader of our output closed early (`vaegan info --format json | head`): stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except EXPECTED_FAILURES as error:
        if debug:
            traceback.print_exc()  # the whole story, with the same exit status as without --debug
        else:
            message = " ".join(str(error).split()) or type(error).__name__  # one line, however it was written
            print(f"vaegan {argv[0]}: error: {message}", file=sys.stderr)
        raise SystemExit(FAILURE_STATUS) from None


def run(name: str, options: list[str]) -> None:
    """Parse the options of command `name` and run it."""
    if name in LIGHTNING_COMMANDS:
        from vaegan.train.command import RUN_FAILURES, run_lightning

        try:
            run_lightning([name, *options])
        except RUN_FAILURES as error:
            raise CommandFailed(str(error)) from error
        return
    if name == "encode":
        from vaegan.latents.encode import encode
        from vaegan.latents.job import EncodeJob

        encode(parse(EncodeJob, name, options))
        return
    if name == "probe":
        from vaegan.probe.job import ProbeJob
        from vaegan.probe.run import probe

        probe(parse(ProbeJob, name, options))
        return
    parse(command(name), name, options)


def parse(component: Callable, name: str, options: list[str]):
    """jsonargparse's CLI over `component`: its result, or a one-line `CommandFailed` for options it refuses."""
    from jsonargparse import CLI, ArgumentError, capture_parser

    from vaegan.utils.options import explain_parse_error

    try:
        return CLI(component, args=options, prog=f"vaegan {name}", exit_on_error=False)
    except ArgumentError as error:
        parser = capture_parser(lambda: CLI(component, args=[], prog=f"vaegan {name}"))
        raise CommandFailed(explain_parse_error(error, options, parser.get_defaults().keys(), f"vaegan {name}")) \
            from error


def command(name: str) -> Callable:
    """The function behind a command (imported here, so each command loads only what it needs)."""
    if name in ("convert", "info"):
        from vaegan.formats.commands import convert, info

        return {"convert": convert, "info": info}[name]
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


if __name__ == "__main__":
    main()
