"""Reading and writing tiny autoencoders (`vaegan.autoencoder.tiny`) in the three forms they circulate in.

  pair       the original `<name>_encoder.pth` and `<name>_decoder.pth` (or .safetensors), each the state dict of
             one `nn.Sequential` numbered from 0; the decoder's layer 0 is its parameterless clamp, so its
             indices are ours plus one. A folder holding them, or either file (its sibling is read when present).
  diffusers  a folder with `config.json` of `_class_name: AutoencoderTiny` and our names (only the classic
             variant: diffusers has no stem, pool branch or narrowing decoder).
  single     one .safetensors with our names and the config in its metadata (what `save` writes for any variant).

The architecture of a pair is read off its tensors: which layers are blocks, which are convs and how wide each
is; then the whole state dict must fit the network built from that, or `FormatError` names the keys.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vaegan.autoencoder.tiny import TINY_PRESETS, TinyAutoencoder, TinyConfig
from vaegan.formats.errors import FormatError, read_safetensors
from vaegan.formats.naming import CARD_NAME, CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME, diffusers_version
from vaegan.utils.dtypes import cast_floating
from vaegan.utils.files import check_replaceable, replace_folder_atomically, write_file_atomically

DIFFUSERS_CLASS = "AutoencoderTiny"
PARTS = ("encoder", "decoder")
PAIR_SUFFIXES = (".pth", ".safetensors", ".pt")
PAIR_NAME = re.compile(r"^(?P<stem>.*)_(?P<part>encoder|decoder)$")
OUR_KEY = re.compile(r"^(encoder|decoder)\.layers\.\d+\.")
ORIGINAL_KEY = re.compile(r"^\d+\.")
# diffusers' AutoencoderTiny settings that must have these values for its latents to be ours.
DIFFUSERS_FIXED = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2, "in_channels": 3,
                   "out_channels": 3, "scaling_factor": 1.0, "shift_factor": 0.0}


# ----------------------------------------------------------------------------------------------- telling apart


def pair_part(path: Path) -> str | None:
    """"encoder" or "decoder" for a file named like one half of a pair (`taesd_decoder.pth`), else None."""
    if path.suffix not in PAIR_SUFFIXES:
        return None
    match = PAIR_NAME.match(path.stem)
    return match["part"] if match else None


def is_tiny(path: Path) -> bool:
    """Whether `path` holds a tiny autoencoder in one of the forms of the module doc."""
    if path.is_dir():
        config = path / CONFIG_NAME
        if config.is_file():
            try:
                return is_tiny_config(config.read_text())
            except OSError:
                return False
        return any(pair_part(entry) for entry in path.iterdir())
    if pair_part(path):
        return True
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as file:
                return any(OUR_KEY.match(key) for key in file.keys())
        except Exception:  # not readable: the VAE loader names the problem
            return False
    return False


# ----------------------------------------------------------------------------------------------- reading


def load_tiny(path: Path, dtype: torch.dtype | None = None) -> TinyAutoencoder:
    """The tiny autoencoder at `path` (see `is_tiny`), strictly: every tensor must fit, none may be missing."""
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        config = _diffusers_config(path / CONFIG_NAME)
        tensors, metadata = _read(path / WEIGHTS_NAME)
        config = _with_metadata(config, metadata, path / WEIGHTS_NAME)
        return _build(config, tensors, path / WEIGHTS_NAME, dtype)
    files = _pair_files(path)
    if files:
        tensors: dict[str, torch.Tensor] = {}
        config = None
        for part, file in files.items():
            part_tensors, metadata = _read(file)
            if part_tensors and all(OUR_KEY.match(key) for key in part_tensors):
                tensors |= part_tensors
            else:
                tensors |= _from_original(part_tensors, part, file)
            config = _with_metadata(config, metadata, file)
        source = " and ".join(str(file) for file in files.values())
        return _build(config or infer_config(tensors, source), tensors, source, dtype)
    tensors, metadata = _read(path)
    config = _with_metadata(None, metadata, path) or infer_config(tensors, str(path))
    return _build(config, tensors, str(path), dtype)


def is_tiny_config(config_json: str) -> bool:
    """Whether a config stored as JSON (a training checkpoint's, a file's metadata) describes a tiny autoencoder."""
    try:
        return json.loads(config_json).get("_class_name") == DIFFUSERS_CLASS
    except (ValueError, AttributeError):
        return False


def tiny_from_tensors(config: dict, tensors: dict[str, torch.Tensor], source: str | Path,
                      dtype: torch.dtype | None = None) -> TinyAutoencoder:
    """The tiny autoencoder of a config dict and its tensors in our naming (a training checkpoint's student)."""
    try:
        tiny_config = TinyConfig.from_dict(config)
    except (TypeError, ValueError) as error:
        raise FormatError(f"{source}: unreadable tiny autoencoder config ({error})") from error
    return _build(tiny_config, tensors, source, dtype)


def _pair_files(path: Path) -> dict[str, Path]:
    """{part: file} of the pair that `path` is (a folder) or belongs to (one file); {} for a single file."""
    if path.is_dir():
        found = {}
        for entry in sorted(path.iterdir()):
            part = pair_part(entry)
            if part and part in found:
                raise FormatError(f"{path} holds two {part} files ({found[part].name}, {entry.name}); keep one pair")
            if part:
                found[part] = entry
        return dict(sorted(found.items(), key=lambda item: PARTS.index(item[0])))
    part = pair_part(path)
    if part is None:
        return {}
    other = "decoder" if part == "encoder" else "encoder"
    stem = PAIR_NAME.match(path.stem)["stem"]
    siblings = [path.with_name(f"{stem}_{other}{suffix}") for suffix in PAIR_SUFFIXES]
    found = {part: path}
    for sibling in siblings:
        if sibling.is_file():
            found[other] = sibling
            break
    return dict(sorted(found.items(), key=lambda item: PARTS.index(item[0])))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FormatError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        # weights_only refuses pickled code: a downloaded .pth must not run anything.
        entries = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FormatError(f"{path} is not a readable torch file of plain tensors ({type(error).__name__}); "
                          "re-download it, or convert it to safetensors") from error
    if not isinstance(entries, dict) or not all(torch.is_tensor(value) for value in entries.values()):
        raise FormatError(f"{path} is not a state dict of tensors")
    return entries, {}


def _from_original(tensors: dict[str, torch.Tensor], part: str, path: Path) -> dict[str, torch.Tensor]:
    """One half of the original pair -> our names (the decoder's indices are ours plus one: its clamp is 0)."""
    offset = 1 if part == "decoder" else 0
    renamed = {}
    for key, tensor in tensors.items():
        if not ORIGINAL_KEY.match(key):
            raise FormatError(f"{path}: {key!r} is not a tensor name of a TAESD {part} (numbered layers)")
        index, rest = key.split(".", 1)
        renamed[f"{part}.layers.{int(index) - offset}.{rest}"] = tensor
    return renamed


def _layers(tensors: dict[str, torch.Tensor], part: str) -> dict[int, dict[str, torch.Tensor]]:
    layers: dict[int, dict[str, torch.Tensor]] = {}
    prefix = f"{part}.layers."
    for key, tensor in tensors.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            layers.setdefault(int(index), {})[rest] = tensor
    return dict(sorted(layers.items()))


def _levels(layers: dict[int, dict[str, torch.Tensor]], first_width: int, skip: set[int]) -> tuple[list, list]:
    """Widths and block counts of the levels, read in layer order: a block joins the current level, any other
    conv opens the next one at its width (layers in `skip` are neither)."""
    widths, counts = [first_width], [0]
    for index, layer in layers.items():
        if index in skip:
            continue
        if "conv.0.weight" in layer:
            counts[-1] += 1
        else:
            widths.append(layer["weight"].shape[0])
            counts.append(0)
    return widths, counts


def _encoder_fields(layers: dict[int, dict[str, torch.Tensor]], source: str) -> dict:
    """Encoder settings read off its layers: convs before the first block are the stem (each + ReLU) unless a
    single conv sits right before it; then each conv opens a level, and the last conv makes the latents."""
    blocks = [index for index, layer in layers.items() if "conv.0.weight" in layer]
    if not blocks:
        raise FormatError(f"{source}: the encoder has no TAESD blocks")
    before = [index for index in layers if index < blocks[0]]
    stem = [] if before == [blocks[0] - 1] else before
    last_conv = max(layers)
    widths, counts = _levels(layers, layers[blocks[0]]["conv.0.weight"].shape[0], {*before, last_conv})
    return {"encoder_stem_channels": [layers[index]["weight"].shape[0] for index in stem],
            "encoder_block_out_channels": widths, "num_encoder_blocks": counts,
            "latent_channels": layers[last_conv]["weight"].shape[0]}


def _decoder_fields(layers: dict[int, dict[str, torch.Tensor]]) -> dict:
    """Decoder settings: a conv from the latents, then blocks, and a conv to each next width (after an
    upsampling), the last one to RGB."""
    first, last = min(layers), max(layers)
    widths, counts = _levels(layers, layers[first]["weight"].shape[0], {first, last})
    return {"decoder_block_out_channels": widths, "num_decoder_blocks": counts,
            "latent_channels": layers[first]["weight"].shape[1]}


def infer_config(tensors: dict[str, torch.Tensor], source: str) -> TinyConfig:
    """The architecture the tensors describe. A missing half takes the published variant's matching other half
    (or a mirror of the present one), so that a decoder-only previewer still knows its downsampling factor."""
    try:
        fields: dict = {}
        encoder, decoder = _layers(tensors, "encoder"), _layers(tensors, "decoder")
        if encoder:
            fields |= _encoder_fields(encoder, source)
        if decoder:
            fields |= _decoder_fields(decoder)
    except (KeyError, IndexError, ValueError) as error:
        raise FormatError(f"{source} does not look like a TAESD-family network ({error})") from error
    if not fields:
        raise FormatError(f"{source} holds no TAESD encoder or decoder tensors")
    fields["midblock_pool"] = any(".pool." in key for key in tensors)
    if fields["midblock_pool"]:
        fields["patch_size"] = TINY_PRESETS["taef2"].patch_size  # TAEF2's space: FLUX.2's patches, folded back
    present = {"encoder" if encoder else "decoder"} if not (encoder and decoder) else set()
    if present:
        fields |= _other_half(fields, present.pop())
    try:
        return TinyConfig.from_dict(fields)
    except ValueError as error:
        raise FormatError(f"{source}: the tensors do not make a consistent tiny autoencoder ({error})") from error


def _other_half(fields: dict, present: str) -> dict:
    names = {"encoder": ("encoder_block_out_channels", "num_encoder_blocks", "encoder_stem_channels"),
             "decoder": ("decoder_block_out_channels", "num_decoder_blocks")}
    missing = "decoder" if present == "encoder" else "encoder"
    for preset in TINY_PRESETS.values():
        if all(list(getattr(preset, name)) == list(fields[name]) for name in names[present]):
            return {name: getattr(preset, name) for name in names[missing]}
    if missing == "encoder":
        widths = fields["decoder_block_out_channels"][::-1]
        return {"encoder_block_out_channels": widths, "num_encoder_blocks": fields["num_decoder_blocks"][::-1],
                "encoder_stem_channels": ()}
    return {"decoder_block_out_channels": fields["encoder_block_out_channels"][::-1],
            "num_decoder_blocks": fields["num_encoder_blocks"][::-1]}


def _diffusers_config(path: Path) -> TinyConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FormatError(f"{path} is not readable JSON ({error})") from error
    different = {key: data[key] for key, value in DIFFUSERS_FIXED.items() if key in data and data[key] != value}
    if different:
        raise FormatError(f"{path}: this AutoencoderTiny has {different}; vaegan runs tiny autoencoders with "
                          f"{ {key: DIFFUSERS_FIXED[key] for key in different} } only")
    try:
        return TinyConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise FormatError(f"{path} is not a config this package supports: {error}") from error


def _with_metadata(config: TinyConfig | None, metadata: dict[str, str], path: Path) -> TinyConfig | None:
    """The config from our metadata (all fields), else `config` unchanged."""
    if METADATA_KEY not in metadata:
        return config
    try:
        stored = json.loads(metadata[METADATA_KEY])
        return TinyConfig.from_dict((config.to_dict() if config else {}) | stored)
    except (TypeError, ValueError) as error:
        raise FormatError(f"{path}: unreadable {METADATA_KEY} metadata ({error})") from error


def _build(config: TinyConfig, tensors: dict[str, torch.Tensor], source: str | Path,
           dtype: torch.dtype | None) -> TinyAutoencoder:
    has = {part: any(key.startswith(f"{part}.") for key in tensors) for part in PARTS}
    with torch.device("meta"):  # no random init: every parameter is assigned from the file below
        model = TinyAutoencoder(config, encoder=has["encoder"], decoder=has["decoder"], source=str(source))
    expected = {key: value.shape for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshapen = sorted(f"{key} {tuple(tensors[key].shape)} != {tuple(expected[key])}"
                       for key in set(expected) & set(tensors) if tensors[key].shape != expected[key])
    problems = [f"{len(keys)} {what}: {', '.join(keys[:10])}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshapen)) if keys]
    if problems:
        raise FormatError(f"{source} does not match the tiny autoencoder {config}:\n  " + "\n  ".join(problems))
    dtype = dtype or torch.float32
    model.load_state_dict({key: cast_floating(value, dtype).contiguous() for key, value in tensors.items()},
                          assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------- writing


def diffusers_config(config: TinyConfig) -> dict:
    """config.json of diffusers' `AutoencoderTiny` for `config` (exactly the keys its constructor takes)."""
    if not config.diffusers_compatible:
        raise ValueError("diffusers' AutoencoderTiny has one width throughout and no stem or pool branch, so it "
                         "cannot run this tiny autoencoder: save it as format='pair' or 'single-file'")
    return {
        "_class_name": DIFFUSERS_CLASS, "_diffusers_version": diffusers_version(),
        "encoder_block_out_channels": list(config.encoder_block_out_channels),
        "decoder_block_out_channels": list(config.decoder_block_out_channels),
        "num_encoder_blocks": list(config.num_encoder_blocks),
        "num_decoder_blocks": list(config.num_decoder_blocks),
        "latent_channels": config.latent_channels, "latent_magnitude": 3, "latent_shift": 0.5,
        "force_upcast": False, **DIFFUSERS_FIXED,
    }


def save_tiny(model: TinyAutoencoder, path: Path, format: str, dtype: torch.dtype | None = None,
              card: str | None = None) -> Path:
    """Write `model` as a diffusers folder, one .safetensors file, or a pair of them in the original naming."""
    tensors = {key: cast_floating(value.detach().cpu(), dtype).contiguous()
               for key, value in model.state_dict().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(model.config.to_dict())}
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "single-file":
        if path.suffix != ".safetensors":
            raise ValueError(f"a single-file tiny autoencoder is written as .safetensors, got {path.name!r}")
        write_file_atomically(path, lambda file: save_file(tensors, str(file), metadata=metadata))
        return path
    if format == "diffusers":
        config_json = json.dumps(diffusers_config(model.config), indent=2) + "\n"

        def write(folder: Path) -> None:
            (folder / CONFIG_NAME).write_text(config_json)
            if card is not None:
                (folder / CARD_NAME).write_text(card)
            save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
    elif format == "pair":
        def write(folder: Path) -> None:
            for part in PARTS:
                offset = 1 if part == "decoder" else 0
                prefix = f"{part}.layers."
                original = {}
                for key, value in tensors.items():
                    if key.startswith(prefix):
                        index, rest = key[len(prefix):].split(".", 1)
                        original[f"{int(index) + offset}.{rest}"] = value
                if original:
                    save_file(original, str(folder / f"{path.name}_{part}.safetensors"), metadata=metadata)
            if card is not None:
                (folder / CARD_NAME).write_text(card)
    else:
        raise ValueError(f"format must be 'diffusers', 'single-file' or 'pair', got {format!r}")
    check_replaceable(path, lambda entry: entry.name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME) or bool(
        pair_part(entry)), format, "a tiny autoencoder")
    replace_folder_atomically(path, write)
    return path
