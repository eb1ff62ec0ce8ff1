"""Read VAEs from diffusers folders and single files in the original (CompVis, BFL) naming.

`load` accepts what people actually have: a diffusers folder (`AutoencoderKL` or FLUX.2's
`AutoencoderKLFlux2`, or a whole pipeline folder with `vae/`), a `.safetensors`/`.ckpt`/`.pt`/`.pth` file in
diffusers or original naming, with or without the `first_stage_model.`/`vae.` prefix, also a whole Stable
Diffusion checkpoint, and a hub name (`owner/name`, see `vaegan.formats.hub`). It is strict: any missing,
unexpected or misshapen tensor, an unreadable file, or a config that contradicts the weights raises
`FormatError` naming the file and the keys; nothing is ever loaded partially.

`vaegan.formats.save` writes VAEs back, and `vaegan.formats.naming` renames between the two namings:
`down.i.block.j` <-> `down_blocks.i.resnets.j`, decoder `up.(n-1-i)` <-> `up_blocks.i` (levels numbered from
the lowest resolution vs. in execution order), `mid.attn_1.{q,k,v,proj_out}` as 1x1 convs <->
`mid_block.attentions.0.{to_q,to_k,to_v,to_out.0}` as Linear. FLUX.2's original files (Black Forest Labs'
`ae.safetensors`) also nest the quant convs: `encoder.quant_conv` <-> `quant_conv`, `decoder.post_quant_conv`
<-> `post_quant_conv`; its `bn.*` statistics have the same names in both.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from vaegan.autoencoder.network import PRESETS, AutoencoderConfig, AutoencoderKL, preset
from vaegan.autoencoder.normalization import LatentNormalization
from vaegan.autoencoder.preview import LatentPreview
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.formats import hub
from vaegan.formats.checkpoints import load_error_reason, training_weights
from vaegan.formats.errors import FormatError, read_safetensors
from vaegan.formats.naming import (
    ATTENTION_PROJECTIONS,
    CONFIG_NAME,
    DIFFUSERS_KEYS,
    LEGACY_ATTENTION,
    METADATA_KEY,
    NESTED_QUANT_CONVS,
    ORIGINAL_NAMING,
    PREVIEW_METADATA_KEY,
    PREVIEW_NAME,
    WEIGHTS_CANDIDATES,
    rename,
    to_diffusers_name,
    to_original_name,
)
from vaegan.formats.tiny import is_tiny, is_tiny_config, load_tiny, tiny_from_tensors
from vaegan.utils.dtypes import cast_floating

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Where a whole Stable Diffusion checkpoint (or a model wrapper) keeps its VAE.
VAE_PREFIXES = ("first_stage_model.", "vae.")
# ldm's VAE training checkpoints also hold the loss (LPIPS, discriminator, logvar): not part of the VAE.
TRAINING_LOSS_PREFIX = "loss."
MAX_LISTED_KEYS = 10

# A count of the batches behind FLUX.2's statistics, which nothing reads once they are measured. diffusers'
# FLUX.2 conversion carries only running_mean and running_var, and torch's BatchNorm loader starts a count
# that a state dict lacks at 0: so does `load`; every other tensor must be in the file.
BATCHES_TRACKED = "bn.num_batches_tracked"


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


def _read_weights_file(path: Path, weights: str | None = None) -> tuple[dict[str, object], dict[str, str]]:
    """All entries of a weights file and its safetensors metadata, refusing anything but plain tensors.

    For a vaegan training checkpoint, `weights` picks the EMA (`"ema"`) or the trained (`"model"`) weights.
    """
    if path.name.endswith(".safetensors.index.json"):
        return _read_sharded(path), {}
    if weights is not None and path.suffix not in TORCH_SUFFIXES:
        raise FormatError(f"{path} is not a vaegan training checkpoint: weights={weights!r} does not apply to it")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        try:
            # weights_only refuses pickled code and arbitrary objects: a checkpoint must not run anything.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise FormatError(
                f"{path} is not a readable torch checkpoint of plain tensors ({load_error_reason(error)}); "
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
        entries, _ = _read_weights_file(shard_path)
        expected = {key for key, name in weight_map.items() if name == shard}
        if missing := sorted(expected - entries.keys()):
            raise FormatError(f"{shard_path} lacks {len(missing)} tensors its index assigns to it: {missing[:5]}")
        tensors.update(entries)
    return tensors


def _training_checkpoint_weights(
    checkpoint: dict, path: Path, weights: str | None
) -> tuple[dict[str, object], dict[str, str]]:
    """The autoencoder of a vaegan training checkpoint (`vaegan.formats.checkpoints` knows where it is), and its
    architecture config as metadata."""
    try:
        tensors = training_weights(checkpoint, path, weights)
    except ValueError as error:
        raise FormatError(str(error)) from error
    return tensors, {METADATA_KEY: json.dumps(checkpoint[METADATA_KEY])}


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

    original_naming = any(ORIGINAL_NAMING.match(key) for key in selected)
    nested_quant_convs = any(key.startswith(nested) for key in selected for _, nested in NESTED_QUANT_CONVS)
    num_levels = 0
    tensors = {}
    if original_naming:
        up_levels = {int(m[1]) for key in selected if (m := re.match(r"decoder\.up\.(\d+)\.", key))}
        num_levels = max(up_levels, default=-1) + 1
    for key, tensor in selected.items():
        if original_naming:
            name = to_diffusers_name(key, num_levels)
        else:
            name = rename(key, LEGACY_ATTENTION, to_diffusers=True)
        if ATTENTION_PROJECTIONS.search(name) and tensor.ndim > 2:
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
) -> AutoencoderKL | TinyAutoencoder:
    """Load a VAE from a diffusers folder, a pipeline folder, a single weights file, a vaegan training
    checkpoint (its EMA weights by default; `weights="model"` for the raw trained weights), or a Hugging Face
    hub name, in eval mode. A tiny autoencoder (TAESD's pair of files, a diffusers `AutoencoderTiny` folder, or
    a file `vaegan.save` wrote) comes back as a `TinyAutoencoder` (`vaegan.formats.tiny`).

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
    resolved = _resolve(path, subfolder, revision)
    if is_tiny(resolved):
        if config is not None or scaling_factor is not None or shift_factor is not None or weights is not None:
            raise FormatError(f"{resolved} is a tiny autoencoder: config, scaling_factor, shift_factor and weights "
                              "do not apply to it (its latents are already normalised)")
        return load_tiny(resolved, dtype)
    weights_path, config_path = _locate(resolved)
    entries, metadata = _read_weights_file(weights_path, weights)
    return _build(entries, metadata, weights_path, config_path, config, scaling_factor, shift_factor, dtype)


def load_checkpoint(checkpoint: dict, path: str | os.PathLike, weights: str | None = None) -> AutoencoderKL:
    """The VAE of a vaegan training checkpoint already read (`vaegan.formats.checkpoints.read_checkpoint`), as
    `load(path, weights=weights)` would load it, for callers that read the checkpoint's other entries too."""
    if METADATA_KEY not in checkpoint:
        raise FormatError(f"{path} is not a vaegan training checkpoint (it has no {METADATA_KEY}); "
                          "`vaegan convert` reads any other VAE file")
    entries, metadata = _training_checkpoint_weights(checkpoint, Path(path), weights)
    return _build(entries, metadata, Path(path))


def _build(
    entries: dict[str, object], metadata: dict[str, str], weights_path: Path, config_path: Path | None = None,
    config: AutoencoderConfig | str | None = None, scaling_factor: float | None = None,
    shift_factor: float | None = None, dtype: torch.dtype | None = None,
) -> AutoencoderKL:
    """The VAE of the entries read from `weights_path`, its architecture from `config`, else config.json at
    `config_path`, else the metadata, else the tensor shapes (see `load`)."""
    if METADATA_KEY in metadata and is_tiny_config(metadata[METADATA_KEY]):  # a distilled student's checkpoint
        return tiny_from_tensors(json.loads(metadata[METADATA_KEY]), entries, weights_path, dtype)
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

    with torch.device("meta"):  # no random init: every parameter is assigned from the file below
        vae = AutoencoderKL(config)
    model_shapes = {k: v.shape for k, v in vae.state_dict().items()}
    if BATCHES_TRACKED in model_shapes:
        weights.tensors.setdefault(BATCHES_TRACKED, torch.tensor(0))
    _check_fits(weights, model_shapes, origin)
    dtype = dtype or torch.float32
    vae.load_state_dict({k: cast_floating(v, dtype).contiguous() for k, v in weights.tensors.items()}, assign=True)
    # The preview map reads latents normalised as the file declares; overridden factors re-express it.
    stored = LatentNormalization.of(vae)
    overrides = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
    vae.config = config.replace(**{name: value for name, value in overrides.items() if value is not None})
    preview = _read_preview(weights_path, config_path, metadata, stored.channels(config.latent_channels))
    vae.latent_preview = None if preview is None else _renormalized(preview, stored, LatentNormalization.of(vae))
    return vae.eval()


def _read_preview(
    weights_path: Path, config_path: Path | None, metadata: dict[str, str], channels: int
) -> LatentPreview | None:
    """The latent preview map stored with the weights (see `vaegan.formats.save`), if any, for latents of
    `channels` normalised channels."""
    if config_path is not None:
        source = config_path.parent / PREVIEW_NAME
        if not source.is_file():
            return None
    elif PREVIEW_METADATA_KEY in metadata:
        source = f"the {PREVIEW_METADATA_KEY} metadata of {weights_path}"
    else:
        return None
    try:
        text = source.read_text() if isinstance(source, Path) else metadata[PREVIEW_METADATA_KEY]
        preview = LatentPreview.from_json(json.loads(text))
    except (OSError, json.JSONDecodeError, ValueError) as error:
        raise FormatError(f"{source} is not a readable latent preview map ({error}); delete it, or fit a new "
                          "one with `vaegan convert --fit_preview`") from error
    if preview.channels != channels:
        raise FormatError(f"{source} maps {preview.channels} latent channels, but this VAE's normalised latents "
                          f"have {channels}; delete it, or fit a new one with `vaegan convert --fit_preview`")
    return preview


def _renormalized(preview: LatentPreview, stored: LatentNormalization, new: LatentNormalization) -> LatentPreview:
    """`preview`, fitted to latents normalised as `stored`, for latents normalised as `new` (a normalisation of
    the same kind: `load`'s overrides change factors, never the kind)."""
    if new == stored:
        return preview
    probe = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1).expand(2, preview.channels, 1, 1)
    seen = stored.normalize(new.denormalize(probe))  # (2, C, 1, 1): `new`'s 0 and 1 as the stored map reads them
    return preview.reparametrized(scale=seen[1] - seen[0], shift=seen[0])
