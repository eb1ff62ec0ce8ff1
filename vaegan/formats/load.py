"""Read and write VAEs as diffusers folders and as single files in the original (CompVis, BFL) naming.

`load` accepts what people actually have: a diffusers folder (`AutoencoderKL` or FLUX.2's
`AutoencoderKLFlux2`, or a whole pipeline folder with `vae/`), a `.safetensors`/`.ckpt`/`.pt`/`.pth` file in
diffusers or original naming, with or without the `first_stage_model.`/`vae.` prefix, also a whole Stable
Diffusion checkpoint, and a hub name (`owner/name`, see `hub.py`). It is strict: any missing, unexpected or
misshapen tensor, an unreadable file, or a config that contradicts the weights raises `FormatError` naming the
file and the keys; nothing is ever loaded partially.

`save` writes the two artifacts the ecosystem loads: a diffusers folder (`from_pretrained`) and one
safetensors file in the original naming (ComfyUI, A1111, `from_single_file`, Black Forest Labs' FLUX.2 code),
carrying our config in its metadata so that `load` needs no guessing. Writes are atomic: a failure never
replaces a good artifact.

Original naming <-> diffusers: `down.i.block.j` <-> `down_blocks.i.resnets.j`, decoder `up.(n-1-i)` <->
`up_blocks.i` (levels numbered from the lowest resolution vs. in execution order), `mid.attn_1.{q,k,v,proj_out}`
as 1x1 convs <-> `mid_block.attentions.0.{to_q,to_k,to_v,to_out.0}` as Linear. FLUX.2's original files (Black
Forest Labs' `ae.safetensors`) also nest the quant convs: `encoder.quant_conv` <-> `quant_conv`,
`decoder.post_quant_conv` <-> `post_quant_conv`; its `bn.*` statistics have the same names in both.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vaegan.autoencoder.network import PRESETS, AutoencoderConfig, AutoencoderKL, preset
from vaegan.formats import hub
from vaegan.utils.files import replace_folder_atomically, write_file_atomically

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
# Our config JSON: in a single file's safetensors metadata, and in a training checkpoint's top-level dict.
METADATA_KEY = "vaegan_config"
# In order of preference: full precision first, the fp16 variant only when it is all there is.
WEIGHTS_CANDIDATES = (
    WEIGHTS_NAME,
    WEIGHTS_NAME + ".index.json",  # sharded: the index maps each tensor to its shard file
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Where a whole Stable Diffusion checkpoint (or a model wrapper) keeps its VAE.
VAE_PREFIXES = ("first_stage_model.", "vae.")
# ldm's VAE training checkpoints also hold the loss (LPIPS, discriminator, logvar): not part of the VAE.
TRAINING_LOSS_PREFIX = "loss."
MAX_LISTED_KEYS = 10

# The config.json keys of each diffusers class, beyond `_class_name`: its constructor's arguments, and so the
# only keys `from_pretrained` takes without a warning (it ignores the others, and so does `load`).
_SHARED_KEYS = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
    "norm_num_groups", "sample_size", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
)
DIFFUSERS_KEYS = {
    "AutoencoderKL": (
        *_SHARED_KEYS, "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    ),
    # No scalar normalisation: FLUX.2's pipelines normalise with the `bn` statistics alone.
    "AutoencoderKLFlux2": (
        *_SHARED_KEYS, "decoder_block_out_channels", "batch_norm_eps", "batch_norm_momentum", "patch_size",
    ),
}
# A count of the batches behind FLUX.2's statistics, which nothing reads once they are measured. diffusers'
# FLUX.2 conversion carries only running_mean and running_var, and torch's BatchNorm loader starts a count
# that a state dict lacks at 0: so does `load`; every other tensor must be in the file.
BATCHES_TRACKED = "bn.num_batches_tracked"

# (original, diffusers) name fragments; `{i}` is a number carried across. The decoder's level index is
# additionally reversed (see `_reverse_up_levels`). Every fragment is dot-delimited, so no rule can
# match inside a name that is already in the other convention.
_RENAMES = [
    ("encoder.down.{i}.block.", "encoder.down_blocks.{i}.resnets."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{i}.block.", "decoder.up_blocks.{i}.resnets."),
    ("decoder.up.{i}.upsample.", "decoder.up_blocks.{i}.upsamplers.0."),
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."),
    (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."),
    (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".nin_shortcut.", ".conv_shortcut."),
    (".norm_out.", ".conv_norm_out."),
]
# diffusers < 0.14 named the attention projections differently; single files from that era still circulate.
_LEGACY_ATTENTION = [
    (".attentions.0.query.", ".attentions.0.to_q."),
    (".attentions.0.key.", ".attentions.0.to_k."),
    (".attentions.0.value.", ".attentions.0.to_v."),
    (".attentions.0.proj_attn.", ".attentions.0.to_out.0."),
]
# Black Forest Labs' FLUX.2 autoencoder keeps the quant convs inside its encoder and decoder; CompVis, sgm and
# diffusers keep them at the top level. (top level, nested) prefixes.
_NESTED_QUANT_CONVS = [("quant_conv.", "encoder.quant_conv."), ("post_quant_conv.", "decoder.post_quant_conv.")]
_ATTENTION_PROJECTIONS = re.compile(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_ORIGINAL_NAMING = re.compile(r"^(encoder|decoder)\.(down|up|mid)\.")


class FormatError(ValueError):
    """A file or folder that is not a VAE this package can load exactly; the message names file and keys."""


# ----------------------------------------------------------------------------------------------- naming


def _rename(key: str, rules: list[tuple[str, str]], to_diffusers: bool) -> str:
    for original, diffusers in rules:
        source, target = (original, diffusers) if to_diffusers else (diffusers, original)
        pattern = re.escape(source).replace(re.escape("{i}"), r"(\d+)")
        key = re.sub(pattern, target.replace("{i}", r"\1"), key)
    return key


def _reverse_up_levels(key: str, prefix: str, num_levels: int) -> str:
    """`decoder.<prefix>.k.` -> `decoder.<prefix>.(n-1-k).`: the same renumbering in both directions."""
    return re.sub(
        rf"^decoder\.{re.escape(prefix)}\.(\d+)\.",
        lambda m: f"decoder.{prefix}.{num_levels - 1 - int(m[1])}.",
        key,
    )


def to_original_name(key: str, num_levels: int, nested_quant_convs: bool = False) -> str:
    """diffusers name -> original name, e.g. `decoder.up_blocks.0.resnets.1.conv1.weight` ->
    `decoder.up.3.block.1.conv1.weight` for 4 levels; `nested_quant_convs` for Black Forest Labs' FLUX.2
    naming (`quant_conv.weight` -> `encoder.quant_conv.weight`)."""
    if nested_quant_convs:
        for top_level, nested in _NESTED_QUANT_CONVS:
            if key.startswith(top_level):
                key = nested + key[len(top_level):]
    return _reverse_up_levels(_rename(key, _RENAMES, to_diffusers=False), "up", num_levels)


def to_diffusers_name(key: str, num_levels: int) -> str:
    """Original name (CompVis or Black Forest Labs) -> diffusers name; the inverse of `to_original_name`."""
    for top_level, nested in _NESTED_QUANT_CONVS:
        if key.startswith(nested):
            key = top_level + key[len(nested):]
    return _rename(_reverse_up_levels(key, "up", num_levels), _RENAMES, to_diffusers=True)


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class _Weights:
    """A VAE state dict in diffusers naming, and how to name its keys back the way the file does."""

    tensors: dict[str, torch.Tensor]
    path: Path
    prefix: str = ""
    original_naming: bool = False
    num_levels: int = 0
    nested_quant_convs: bool = False

    def file_name(self, key: str) -> str:
        """The name the file uses (or would use) for one of our keys, for error messages."""
        if self.original_naming:
            key = to_original_name(key, self.num_levels, self.nested_quant_convs)
        return self.prefix + key


def _read_tensor_file(path: Path, weights: str | None = None) -> tuple[dict[str, object], dict[str, str]]:
    """All entries of a weights file and its safetensors metadata, refusing anything but plain tensors.

    For a vaegan training checkpoint, `weights` picks the EMA (`"ema"`) or the trained (`"model"`) weights.
    """
    if path.name.endswith(".safetensors.index.json"):
        return _read_sharded(path), {}
    if weights is not None and path.suffix not in TORCH_SUFFIXES:
        raise FormatError(f"{path} is not a vaegan training checkpoint: weights={weights!r} does not apply to it")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as file:
                return {key: file.get_tensor(key) for key in file.keys()}, dict(file.metadata() or {})
        except Exception as error:  # the Rust reader raises its own types for truncated or corrupt files
            raise FormatError(f"{path} is not a readable safetensors file ({error})") from error
    if path.suffix in TORCH_SUFFIXES:
        try:
            # weights_only refuses pickled code and arbitrary objects: a checkpoint must not run anything.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise FormatError(
                f"{path} is not a readable torch checkpoint of plain tensors ({_torch_load_reason(error)}); "
                "if it holds other pickled objects and you trust it, re-save its tensors as safetensors"
            ) from error
        if isinstance(checkpoint, dict) and METADATA_KEY in checkpoint:
            return _training_checkpoint_weights(checkpoint, path, weights)
        if weights is not None:
            raise FormatError(
                f"{path} is not a vaegan training checkpoint: weights={weights!r} does not apply to it"
            )
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint = checkpoint["state_dict"]  # a Lightning/ldm training checkpoint
        if not isinstance(checkpoint, dict):
            raise FormatError(f"{path} holds a {type(checkpoint).__name__}, not a state dict of tensors")
        return checkpoint, {}
    raise FormatError(
        f"{path}: unknown weights format {path.suffix!r}; expected .safetensors, {', '.join(TORCH_SUFFIXES)}"
    )


def _read_sharded(index_path: Path) -> dict[str, object]:
    """All tensors of a sharded safetensors checkpoint, checked against its index: every shard present, and
    every tensor in the shard the index names."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise FormatError(f"{index_path} is not a readable shard index with a weight_map ({error})") from error
    tensors: dict[str, object] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FormatError(f"{index_path} names the shard {shard}, which does not exist")
        entries, _ = _read_tensor_file(shard_path)
        expected = {key for key, name in weight_map.items() if name == shard}
        if missing := sorted(expected - entries.keys()):
            raise FormatError(f"{shard_path} lacks {len(missing)} tensors its index assigns to it: {missing[:5]}")
        tensors.update(entries)
    return tensors


def _training_checkpoint_weights(
    checkpoint: dict, path: Path, weights: str | None
) -> tuple[dict[str, object], dict[str, str]]:
    """The autoencoder of a vaegan training checkpoint: the EMA weights when it kept an EMA, unless told
    otherwise by `weights`."""
    state = checkpoint.get("state_dict", {})
    has_ema = any(key.startswith("ema.") for key in state)
    if weights is None:
        weights = "ema" if has_ema else "model"
    if weights not in ("ema", "model"):
        raise FormatError(f"weights must be 'ema' or 'model', got {weights!r}")
    if weights == "ema" and not has_ema:
        raise FormatError(f"{path} was trained without an EMA (ema_decay: null); use weights='model'")
    prefix = "ema." if weights == "ema" else "vae."
    selected = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return selected, {METADATA_KEY: json.dumps(checkpoint[METADATA_KEY])}


def _torch_load_reason(error: Exception) -> str:
    """The informative line of torch.load's error, without its advice to drop weights_only."""
    detail = str(error).split("WeightsUnpickler error:")[-1].strip()
    return detail.split(". ")[0].splitlines()[0] if detail else type(error).__name__


def _vae_weights(entries: dict[str, object], path: Path) -> _Weights:
    """Select the VAE's tensors (dropping a checkpoint prefix) and bring them into diffusers naming."""
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in entries)), "")
    if prefix:  # a whole checkpoint: the UNet, text encoders etc. sit beside the VAE and are not ours
        selected = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}
    else:
        selected = {k: v for k, v in entries.items() if not k.startswith(TRAINING_LOSS_PREFIX)}
    not_tensors = [prefix + k for k, v in selected.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise FormatError(f"{path}: entries that are not tensors: {_list_keys(not_tensors)}")
    if not selected:
        raise FormatError(f"{path} holds no VAE weights (no encoder./decoder. keys)")

    original_naming = any(_ORIGINAL_NAMING.match(key) for key in selected)
    nested_quant_convs = any(key.startswith(nested) for key in selected for _, nested in _NESTED_QUANT_CONVS)
    num_levels = 0
    tensors = {}
    if original_naming:
        up_levels = {int(m[1]) for key in selected if (m := re.match(r"decoder\.up\.(\d+)\.", key))}
        num_levels = max(up_levels, default=-1) + 1
    for key, tensor in selected.items():
        if original_naming:
            name = to_diffusers_name(key, num_levels)
        else:
            name = _rename(key, _LEGACY_ATTENTION, to_diffusers=True)
        if _ATTENTION_PROJECTIONS.search(name) and tensor.ndim > 2:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # 1x1 conv [C, C, 1, 1] -> Linear
        tensors[name] = tensor
    return _Weights(tensors, path, prefix, original_naming, num_levels, nested_quant_convs)


def _indices(tensors: dict[str, torch.Tensor], pattern: str) -> set[int]:
    return {int(m[1]) for key in tensors if (m := re.match(pattern, key))}


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" ... and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else "")


def _shape(weights: _Weights, key: str) -> torch.Size:
    if key not in weights.tensors:
        raise FormatError(
            f"{weights.path}: cannot infer the architecture, missing key {weights.file_name(key)}"
        )
    return weights.tensors[key].shape


def _infer_config(weights: _Weights, **factors: float) -> AutoencoderConfig:
    """The architecture implied by tensor shapes, for files that carry no config.

    `norm_num_groups` leaves no trace in the shapes: it is 32 here, as in every public VAE; a model trained
    with other groups needs `config=` (our own single files carry their config, so this is for others').
    Neither does FLUX.2's `batch_norm_eps`: its 1e-4 is assumed wherever `bn` statistics are present.
    """
    levels = len(_indices(weights.tensors, r"encoder\.down_blocks\.(\d+)\."))
    widths = tuple(
        _shape(weights, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)
    )
    # up_blocks run from the lowest resolution up, so they list the decoder's widths in reverse.
    up_levels = len(_indices(weights.tensors, r"decoder\.up_blocks\.(\d+)\."))
    decoder_widths = tuple(
        _shape(weights, f"decoder.up_blocks.{i}.resnets.0.conv1.weight")[0] for i in reversed(range(up_levels))
    )
    latent_channels = _shape(weights, "decoder.conv_in.weight")[1]
    try:
        return AutoencoderConfig(
            in_channels=_shape(weights, "encoder.conv_in.weight")[1],
            out_channels=_shape(weights, "decoder.conv_out.weight")[0],
            block_out_channels=widths,
            decoder_block_out_channels=decoder_widths or None,  # none at all: the key check names them
            layers_per_block=len(_indices(weights.tensors, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
            latent_channels=latent_channels,
            mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in weights.tensors,
            use_quant_conv="quant_conv.weight" in weights.tensors,
            use_post_quant_conv="post_quant_conv.weight" in weights.tensors,
            patch_size=_infer_patch_size(weights, latent_channels),
            **factors,
        )
    except ValueError as error:
        raise FormatError(f"{weights.path}: the weights imply an unsupported model ({error})") from error


def _infer_patch_size(weights: _Weights, latent_channels: int) -> tuple[int, int] | None:
    """The square patch whose patchified latent the `bn` statistics describe (FLUX.2: 128 = 32 x 2 x 2)."""
    if "bn.running_mean" not in weights.tensors:
        return None
    channels = _shape(weights, "bn.running_mean")[0]
    side = math.isqrt(channels // latent_channels)
    if side * side * latent_channels != channels:
        raise FormatError(
            f"{weights.path}: {weights.file_name('bn.running_mean')} has {channels} channels, which is not "
            f"{latent_channels} latent channels times a square patch"
        )
    return side, side


def _architecture_differences(config: AutoencoderConfig, weights: _Weights) -> list[str]:
    """`field=value` pairs where the config contradicts the shapes (empty when shapes are incomplete)."""
    try:
        inferred = _infer_config(weights)
    except FormatError:
        return []  # the key check that follows reports what is missing
    fields = ["in_channels", "out_channels", "block_out_channels", "decoder_block_out_channels", "layers_per_block",
              "latent_channels", "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv", "patch_size"]
    return [
        f"{name}={getattr(config, name)!r} but the weights have {getattr(inferred, name)!r}"
        for name in fields
        if getattr(config, name) != getattr(inferred, name)
    ]


def _check_fits(weights: _Weights, model_shapes: dict[str, torch.Size], config_origin: str) -> None:
    """Raise unless the tensors are exactly the model's parameters: same names, same shapes."""
    missing = [weights.file_name(k) for k in model_shapes if k not in weights.tensors]
    unexpected = [weights.file_name(k) for k in weights.tensors if k not in model_shapes]
    misshapen = [
        f"{weights.file_name(k)} {tuple(t.shape)} (expected {tuple(model_shapes[k])})"
        for k, t in weights.tensors.items()
        if k in model_shapes and t.shape != model_shapes[k]
    ]
    if not (missing or unexpected or misshapen):
        return
    kinds = {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes": misshapen}
    problems = [f"{len(keys)} {what}: {_list_keys(keys)}" for what, keys in kinds.items() if keys]
    raise FormatError(
        f"{weights.path} does not match the VAE described by {config_origin}:\n  " + "\n  ".join(problems)
    )


def _resolve(path: str | os.PathLike, subfolder: str | None, revision: str | None) -> Path:
    """A local file or folder; a hub name (`owner/name`, a string) only when no such local path exists."""
    local = Path(path)
    if local.exists() or not hub.is_repo_id(path):
        if revision is not None:
            raise FormatError(f"{local} is a local path: revision={revision!r} applies to hub names only")
        return local / subfolder if subfolder else local
    try:
        return hub.download_folder(
            str(path), subfolder=subfolder, revision=revision, config_name=CONFIG_NAME,
            weights_names=WEIGHTS_CANDIDATES,
        )
    except hub.HubError as error:
        raise FormatError(str(error)) from error


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a file, a diffusers folder or a pipeline folder."""
    if not path.exists():
        raise FormatError(f"{path} does not exist")
    if path.is_file():
        return path, None
    if not (path / CONFIG_NAME).is_file() and (path / "vae" / CONFIG_NAME).is_file():
        path = path / "vae"  # a whole pipeline folder (model_index.json, unet/, vae/, ...)
    if not (path / CONFIG_NAME).is_file():
        raise FormatError(f"{path} is not a diffusers folder: no {CONFIG_NAME} (nor vae/{CONFIG_NAME})")
    for name in WEIGHTS_CANDIDATES:
        if (path / name).is_file():
            return path / name, path / CONFIG_NAME
    expected = ", ".join(WEIGHTS_CANDIDATES)
    raise FormatError(f"{path} has {CONFIG_NAME} but no weights file; expected one of: {expected}")


def _read_config_json(path: Path) -> AutoencoderConfig:
    """Our config from a diffusers config.json, reading only the keys its class takes (as diffusers does)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise FormatError(f"{path} is not readable JSON ({error})") from error
    class_name = data.get("_class_name", "AutoencoderKL")
    if class_name not in DIFFUSERS_KEYS:
        raise FormatError(f"{path} describes a {class_name}, not one of {', '.join(DIFFUSERS_KEYS)}")
    values = {key: value for key, value in data.items() if key in DIFFUSERS_KEYS[class_name]}
    # The defaults of diffusers' AutoencoderKLFlux2 are FLUX.2's own settings, without scalar factors.
    defaults = PRESETS["flux2"] if class_name == "AutoencoderKLFlux2" else None
    try:
        return AutoencoderConfig.from_dict(values, defaults)
    except (TypeError, ValueError) as error:
        raise FormatError(f"{path} is not a config this package supports: {error}") from error


def _guess_factors(weights: _Weights, scaling_factor: float | None, shift_factor: float | None) -> dict:
    """Latent normalisation for a file with no config: explicit values, else none beside FLUX.2's `bn`
    statistics, else SD's for 4 channels.

    16-channel files are SD3's or Flux's, whose factors differ (1.5305/0.0609 vs 0.3611/0.1159) and cannot be
    told apart from shapes; a wrong guess silently washes images out, so those must be given.
    """
    if scaling_factor is not None:
        return {"scaling_factor": scaling_factor, "shift_factor": shift_factor or 0.0}
    if "bn.running_mean" in weights.tensors:
        return {"scaling_factor": PRESETS["flux2"].scaling_factor, "shift_factor": shift_factor or 0.0}
    latent_channels = _shape(weights, "decoder.conv_in.weight")[1]
    if latent_channels == 4:
        warnings.warn(
            f"{weights.path} carries no config: assuming Stable Diffusion's scaling_factor "
            f"{PRESETS['sd'].scaling_factor}; pass scaling_factor= if it is another model (SDXL: 0.13025)",
            stacklevel=3,
        )
        return {"scaling_factor": PRESETS["sd"].scaling_factor, "shift_factor": shift_factor or 0.0}
    raise FormatError(
        f"{weights.path} carries no config and has {latent_channels} latent channels, so its latent scaling "
        "cannot be guessed; pass scaling_factor= (and shift_factor=), or config='sd3' / config='flux'"
    )


def load(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    config: AutoencoderConfig | str | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    dtype: torch.dtype | None = None,
    weights: str | None = None,
) -> AutoencoderKL:
    """Load a VAE from a diffusers folder, a pipeline folder, a single weights file, a vaegan training
    checkpoint (its EMA weights by default; `weights="model"` for the raw trained weights), or a Hugging Face
    hub name, in eval mode.

    Args:
        path: a local file or folder; or a hub name `owner/name` when no such local path exists, read from
            the Hugging Face cache, and downloaded into it unless HF_HUB_OFFLINE is set.
        subfolder: the folder within `path` or the hub repository that holds the VAE; default: `path` itself
            (a local pipeline folder: its `vae/`), and for a hub name the repository root, then `vae/`.
        revision: for a hub name, the branch, tag or commit to read (default: main).
        config: the architecture, as a config or a preset name; default: the folder's config.json, else the
            file's vaegan metadata, else the tensor shapes.
        scaling_factor, shift_factor: override whatever the source says.
        dtype: of the floating-point parameters and statistics; default fp32, whatever the file's precision
            (highest precision by default, as in diffusers).
        weights: for a vaegan training checkpoint, "ema" or "model".
    """
    weights_path, config_path = _locate(_resolve(path, subfolder, revision))
    entries, metadata = _read_tensor_file(weights_path, weights)
    weights = _vae_weights(entries, weights_path)

    if isinstance(config, str):
        config, origin = preset(config), f"preset {config!r}"
    elif config is not None:
        origin = "the given config"
    elif config_path is not None:
        config, origin = _read_config_json(config_path), str(config_path)
    elif METADATA_KEY in metadata:
        try:
            config = AutoencoderConfig.from_dict(json.loads(metadata[METADATA_KEY]))
        except (TypeError, ValueError) as error:
            raise FormatError(f"{weights_path}: unreadable {METADATA_KEY} metadata ({error})") from error
        origin = f"its {METADATA_KEY} metadata"
    else:
        config = _infer_config(weights, **_guess_factors(weights, scaling_factor, shift_factor))
        origin = "its tensor shapes (norm_num_groups assumed 32)"

    differences = _architecture_differences(config, weights)
    if differences:
        raise FormatError(f"{origin} contradicts the weights in {weights_path}: " + "; ".join(differences))
    overrides = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
    config = config.replace(**{name: value for name, value in overrides.items() if value is not None})

    with torch.device("meta"):  # no random init: every parameter is assigned from the file below
        vae = AutoencoderKL(config)
    model_shapes = {k: v.shape for k, v in vae.state_dict().items()}
    if BATCHES_TRACKED in model_shapes:
        weights.tensors.setdefault(BATCHES_TRACKED, torch.tensor(0))
    _check_fits(weights, model_shapes, origin)
    dtype = dtype or torch.float32
    vae.load_state_dict({k: _cast(v, dtype).contiguous() for k, v in weights.tensors.items()}, assign=True)
    return vae.eval()


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating-point tensors to `dtype`; integers (BatchNorm's batch count) stay what they are."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


# ----------------------------------------------------------------------------------------------- writing


def diffusers_class(config: AutoencoderConfig) -> str:
    """The diffusers class that builds this network: `AutoencoderKLFlux2` when it carries `bn` statistics."""
    return "AutoencoderKLFlux2" if config.patch_size is not None else "AutoencoderKL"


def diffusers_config(config: AutoencoderConfig) -> dict:
    """config.json for the diffusers class of `config`: exactly the keys its constructor takes, so no warnings.

    Raises ValueError for a setting that class cannot hold, rather than writing a folder that loads as
    another model: diffusers' `AutoencoderKL` has no separate decoder widths, and `AutoencoderKLFlux2` no
    scalar or per-channel factors (`force_upcast`, which no FLUX.2 pipeline reads, is left out).
    """
    class_name = diffusers_class(config)
    if class_name == "AutoencoderKL" and config.decoder_block_out_channels is not None:
        raise ValueError(
            f"diffusers' AutoencoderKL has no decoder_block_out_channels (here "
            f"{list(config.decoder_block_out_channels)}): save this VAE as a single file"
        )
    if class_name == "AutoencoderKLFlux2":
        unsupported = {
            name: getattr(config, name)
            for name, identity in [("scaling_factor", 1.0), ("shift_factor", 0.0), ("latents_mean", None)]
            if getattr(config, name) != identity
        }
        if unsupported:
            raise ValueError(
                f"diffusers' AutoencoderKLFlux2 normalises latents with its bn statistics alone, so it cannot "
                f"hold {unsupported}: reset them, or save this VAE as a single file"
            )
    levels = len(config.block_out_channels)
    values = config.to_dict()  # shift_factor stays a number: SD3/Flux pipelines crash on null
    return {
        "_class_name": class_name,
        "_diffusers_version": _diffusers_version(),
        **{key: values[key] for key in DIFFUSERS_KEYS[class_name]},
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "0.30.0"  # diffusers is optional here; this is the oldest version pyproject allows


def _tensors_for_saving(vae: AutoencoderKL, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {key: _cast(tensor.detach().cpu(), dtype).contiguous() for key, tensor in vae.state_dict().items()}


def _original_state_dict(
    tensors: dict[str, torch.Tensor], num_levels: int, nested_quant_convs: bool
) -> dict[str, torch.Tensor]:
    """diffusers-named tensors -> original naming, attention projections as 1x1 conv weights."""
    renamed = {}
    for key, tensor in tensors.items():
        if _ATTENTION_PROJECTIONS.search(key):
            tensor = tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        renamed[to_original_name(key, num_levels, nested_quant_convs)] = tensor.contiguous()
    return renamed


def _check_replaceable(path: Path) -> None:
    """Refuse to write a diffusers folder over a file, or over a folder holding anything but a diffusers VAE."""
    if path.is_file():
        raise FileExistsError(f"{path} is a file; the diffusers format writes a folder")
    if path.is_dir():
        ours = (CONFIG_NAME, CARD_NAME, *WEIGHTS_CANDIDATES)
        foreign = sorted(p.name for p in path.iterdir() if p.name not in ours)
        if foreign:
            raise FileExistsError(
                f"refusing to replace {path}: it holds files a diffusers VAE does not ({', '.join(foreign)})"
            )


def save(
    vae: AutoencoderKL,
    path: str | os.PathLike,
    format: Literal["diffusers", "single-file"] = "diffusers",
    dtype: torch.dtype | None = None,
    card: str | None = None,
) -> Path:
    """Write `vae` as a diffusers folder or as one original-naming `.safetensors` file; returns the path.

    `card` is the folder's README.md (`vaegan.formats.card.model_card`); a single file has none.

    The folder is diffusers' `AutoencoderKL`, or `AutoencoderKLFlux2` for a VAE with FLUX.2's `bn` statistics;
    such a VAE's single file takes Black Forest Labs' naming. `dtype` casts the stored floating-point tensors
    (e.g. torch.float16 for a half-size release); the model is unchanged.
    """
    path = Path(path)
    if format not in ("diffusers", "single-file"):
        raise ValueError(f"format must be 'diffusers' or 'single-file', got {format!r}")
    if format == "single-file" and path.suffix != ".safetensors":
        raise ValueError(f"a single-file VAE is written as .safetensors, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_for_saving(vae, dtype)
    if format == "diffusers":
        config_json = json.dumps(diffusers_config(vae.config), indent=2) + "\n"

        def write_folder(folder: Path) -> None:
            (folder / CONFIG_NAME).write_text(config_json)
            if card is not None:
                (folder / CARD_NAME).write_text(card)
            save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

        _check_replaceable(path)
        replace_folder_atomically(path, write_folder)
    else:
        # FLUX.2's original files are Black Forest Labs'; every other model's, CompVis's.
        nested = vae.config.patch_size is not None
        original = _original_state_dict(tensors, len(vae.config.block_out_channels), nested)
        metadata = {"format": "pt", METADATA_KEY: json.dumps(vae.config.to_dict())}
        write_file_atomically(path, lambda file: save_file(original, str(file), metadata=metadata))
    return path
