"""`vaegan fit` and `vaegan validate`: LightningCLI over `VAEGAN` and `ImageDataModule`, which maps YAML configs
and `--key value` flags onto their arguments, with three additions: a refused option is one line, a checkpoint
named by `--ckpt_path` is checked whole before its hyperparameters are read, and the flat regulariser options of
older configs, command lines and checkpoints are read into their groups (`vaegan.train.regularizer_options`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from vaegan.formats.checkpoints import read_checkpoint
from vaegan.train.data import ImageDataModule
from vaegan.train.distillation import check_stored_latents
from vaegan.train.module import VAEGAN, TrainingDiverged
from vaegan.train.regularizer_options import flat_key_target, migrate_flat_options, warn_flat_options
from vaegan.utils.options import explain_parse_error

# What ends a run with a message for the user rather than a traceback: a run that diverged, a Trainer setting
# Lightning refuses.
RUN_FAILURES = (TrainingDiverged, MisconfigurationException)


class TrainingCLI(LightningCLI):
    """LightningCLI, with the checkpoint named by `--ckpt_path` checked whole and its flat options migrated."""

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:  # one line naming the option or file, not a screen of usage
            subcommand = args[0] if args and args[0] in self._subcommand_parsers else "fit"
            known = self._subcommand_parsers[subcommand].get_defaults().keys()
            raise ValueError(explain_parse_error(error, list(args), known, f"vaegan {subcommand}")) from error

    def _parse_ckpt_path(self) -> None:
        # LightningCLI puts the checkpoint's hyperparameters over the config here (the settings that shape the
        # networks come from the checkpoint). One written before the regulariser options were grouped holds them
        # flat: they are moved into their groups first, as in the configs of that time. `read_checkpoint` refuses
        # one cut short by name rather than with the zip reader's complaint.
        path = self.checkpoint_path()
        if path is None:
            return
        hparams = read_checkpoint(path).get("hyper_parameters") or {}
        hparams.pop("_instantiator", None)
        if hparams:
            model = migrate_flat_options(hparams, path)
            self.config = self.parser.parse_object({self.config.subcommand: {"model": model}}, self.config)

    def instantiate_trainer(self, **kwargs):
        # The model and data are built: stored latents that are not the teacher's are refused now, in one line,
        # rather than in `setup` once the Trainer has introduced itself (the module checks again there for
        # Python callers).
        encoded = getattr(self.datamodule, "encoded", None)
        if encoded is not None:
            check_stored_latents(self.model.teacher, encoded, self.model.hparams.teacher_latents)
        return super().instantiate_trainer(**kwargs)

    def checkpoint_path(self) -> str | None:
        """The `--ckpt_path` of this command when it names a file (Lightning resolves "last" and the like)."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        return path if path and Path(path).is_file() else None


def run_lightning(argv: list[str]) -> None:
    """Run `vaegan fit` or `vaegan validate` with the arguments `argv` (the subcommand first)."""
    use_wandb_offline_unless_logged_in()
    # `args` is the command line on purpose (without --debug), which Lightning warns about when it runs from one.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    TrainingCLI(
        VAEGAN,
        ImageDataModule,
        args=migrate_flat_arguments(argv),
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False, "exit_on_error": False},
    )


def migrate_flat_arguments(argv: list[str]) -> list[str]:
    """`fit`/`validate` arguments with the flat regulariser options of older configs and command lines moved into
    their groups (`--model.eq_weight 1` -> `--model.eq.weight 1`; a config file's `model: {eq_weight: 1}` is
    passed on as its migrated text), each source warned about once."""
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
