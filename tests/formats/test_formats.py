"""Loading and saving VAEs: exact parity with diffusers both ways, single files, and clear refusals."""

import hashlib
import json
import logging
import os
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vaegan
from vaegan import AutoencoderKL, FormatError, preset
from vaegan.formats.card import model_card
from vaegan.formats.naming import to_diffusers_name, to_original_name
from vaegan.formats.save import diffusers_config

diffusers = pytest.importorskip("diffusers")

SMALL = {"block_out_channels": (32, 64), "norm_num_groups": 8, "layers_per_block": 1, "sample_size": 32}
CONFIGS = {"sd": preset("sd", **SMALL), "flux": preset("flux", **SMALL)}


def perturbed(vae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so that GroupNorm's ones and zeros also prove the mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return vae.eval()


def small_vae(name: str = "sd", **overrides) -> AutoencoderKL:
    return perturbed(AutoencoderKL(CONFIGS[name].replace(**overrides)))


def images(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def assert_same_outputs(ours: AutoencoderKL, reference: torch.nn.Module, atol: float = 1e-5) -> None:
    """Posterior mean and decode agree to `atol`; `reference` is ours or a diffusers `AutoencoderKL(Flux2)`."""
    x = images()
    mean = ours.encode(x).mean
    if isinstance(reference, AutoencoderKL):
        expected_mean, expected_image = reference.encode(x).mean, reference.decode(mean)
    else:
        expected_mean, expected_image = reference.encode(x).latent_dist.mean, reference.decode(mean).sample
    torch.testing.assert_close(mean, expected_mean, atol=atol, rtol=0)
    torch.testing.assert_close(ours.decode(mean), expected_image, atol=atol, rtol=0)


@contextmanager
def no_warnings_from_diffusers():
    """Fail on any Python warning or any warning on diffusers' logger (which does not propagate to root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    assert [str(w.message) for w in caught] == []


def digest(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest()


# ------------------------------------------------------------------------------------ parity with diffusers


@pytest.mark.parametrize("name", CONFIGS)
def test_diffusers_folder_loads_with_identical_outputs(tmp_path, name):
    constructor_args = {k: v for k, v in diffusers_config(CONFIGS[name]).items() if not k.startswith("_")}
    reference = perturbed(diffusers.AutoencoderKL(**constructor_args))
    reference.save_pretrained(tmp_path)
    before = digest(tmp_path)

    vae = vaegan.load(tmp_path)

    assert vae.config == CONFIGS[name]
    assert_same_outputs(vae, reference)
    assert digest(tmp_path) == before  # loading never touches the files


@pytest.mark.parametrize("name", CONFIGS)
def test_saved_folder_loads_in_diffusers_without_warnings(tmp_path, name):
    vae = small_vae(name)
    vaegan.save(vae, tmp_path / "vae")

    with no_warnings_from_diffusers():
        reference = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")

    assert_same_outputs(vae, reference.eval())
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert isinstance(config["shift_factor"], float)  # SD3/Flux pipelines crash on null
    assert reference.config.scaling_factor == CONFIGS[name].scaling_factor
    assert reference.config.shift_factor == CONFIGS[name].shift_factor
    assert reference.config.use_quant_conv == (name == "sd")


def test_fp16_variant_and_bin_folders(tmp_path):
    reference = perturbed(diffusers.AutoencoderKL(**{
        k: v for k, v in diffusers_config(CONFIGS["sd"]).items() if not k.startswith("_")
    }))
    reference.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    assert [p.name for p in (tmp_path / "fp16").glob("*.safetensors")] == [
        "diffusion_pytorch_model.fp16.safetensors"
    ]
    reference.float().save_pretrained(tmp_path / "bin", safe_serialization=False)

    from_fp16 = vaegan.load(tmp_path / "fp16")
    assert from_fp16.encoder.conv_in.weight.dtype == torch.float32  # highest precision unless asked
    assert vaegan.load(tmp_path / "fp16", dtype=torch.float16).encoder.conv_in.weight.dtype == torch.float16
    assert_same_outputs(from_fp16, reference)  # the fp16 weights, exactly representable in fp32
    assert_same_outputs(vaegan.load(tmp_path / "bin"), reference)


def test_sharded_folder_written_by_diffusers(tmp_path):
    reference = perturbed(diffusers.AutoencoderKL(**{
        k: v for k, v in diffusers_config(CONFIGS["sd"]).items() if not k.startswith("_")
    }))
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert_same_outputs(vaegan.load(tmp_path / "sharded"), reference)
    shards[-1].unlink()
    with pytest.raises(FormatError, match=rf"index\.json names the shard {shards[-1].name}, which does not exist"):
        vaegan.load(tmp_path / "sharded")


def test_pipeline_folder_loads_its_vae_subfolder(tmp_path):
    vae = small_vae()
    vaegan.save(vae, tmp_path / "vae")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert_same_outputs(vaegan.load(tmp_path), vae)


def test_explicit_factors_override_the_file(tmp_path):
    vaegan.save(small_vae("flux"), tmp_path)
    vae = vaegan.load(tmp_path, scaling_factor=0.5, shift_factor=0.25)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.5, 0.25)


# ------------------------------------------------------------------------------------ single files


def test_names_round_trip_between_conventions():
    vae = AutoencoderKL(preset("sd", block_out_channels=(32, 32, 64), norm_num_groups=8))
    for key in vae.state_dict():
        assert to_diffusers_name(to_original_name(key, 3), 3) == key
    # The decoder's levels run in opposite orders: diffusers' first up block is the original's last.
    expected = {
        "decoder.up_blocks.0.resnets.2.conv1.weight": "decoder.up.2.block.2.conv1.weight",
        "decoder.up_blocks.1.upsamplers.0.conv.bias": "decoder.up.1.upsample.conv.bias",
        "encoder.mid_block.attentions.0.to_out.0.weight": "encoder.mid.attn_1.proj_out.weight",
    }
    assert {key: to_original_name(key, 3) for key in expected} == expected


def test_single_file_has_original_names_and_our_config(tmp_path):
    vae = small_vae()
    path = vaegan.save(vae, tmp_path / "vae.safetensors", format="single-file")

    with safe_open(str(path), framework="pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
        attention = file.get_tensor("encoder.mid.attn_1.q.weight")
    assert "encoder.down.0.block.0.conv1.weight" in keys and "decoder.norm_out.weight" in keys
    assert not any("down_blocks" in key or "up_blocks" in key for key in keys)
    assert attention.shape == (64, 64, 1, 1)  # 1x1 conv, as ComfyUI and ldm expect
    assert metadata["format"] == "pt"
    assert json.loads(metadata["vaegan_config"]) == vae.config.to_dict()

    before = digest(path)
    loaded = vaegan.load(path)
    assert loaded.config == vae.config
    assert_same_outputs(loaded, vae)
    assert digest(path) == before


@pytest.mark.parametrize("name", CONFIGS)
def test_single_file_is_read_by_diffusers_importer(tmp_path, name):
    vae = small_vae(name)
    vaegan.save(vae, tmp_path / "vae.safetensors", format="single-file")
    vaegan.save(vae, tmp_path / "config")  # from_single_file takes the architecture from a diffusers folder

    reference = diffusers.AutoencoderKL.from_single_file(
        tmp_path / "vae.safetensors", config=str(tmp_path / "config")
    )
    assert_same_outputs(vae, reference.eval())


def test_whole_sd_checkpoint_ckpt(tmp_path):
    vae = small_vae()
    vaegan.save(vae, tmp_path / "vae.safetensors", format="single-file")
    vae_tensors = load_file(tmp_path / "vae.safetensors")
    state_dict = {f"first_stage_model.{key}": tensor for key, tensor in vae_tensors.items()}
    state_dict["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    state_dict["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
    torch.save({"state_dict": state_dict, "global_step": 10}, tmp_path / "sd.ckpt")

    # No metadata in a .ckpt: the config says what shapes cannot (norm_num_groups=8).
    loaded = vaegan.load(tmp_path / "sd.ckpt", config=vae.config)
    assert_same_outputs(loaded, vae)


@pytest.mark.parametrize("naming", ["original", "diffusers"])
@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
def test_architecture_is_inferred_from_shapes(tmp_path, naming, prefix):
    vae = perturbed(AutoencoderKL(preset("sd", block_out_channels=(32, 64), layers_per_block=1)))
    vaegan.save(vae, tmp_path / "vae.safetensors", format="single-file")
    tensors = load_file(tmp_path / "vae.safetensors") if naming == "original" else vae.state_dict()
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, tmp_path / "bare.safetensors")

    with pytest.warns(UserWarning, match="scaling_factor 0.18215"):
        loaded = vaegan.load(tmp_path / "bare.safetensors")

    assert loaded.config == vae.config.replace(sample_size=loaded.config.sample_size)
    assert_same_outputs(loaded, vae)


def test_legacy_attention_names_load(tmp_path):
    vae = small_vae()
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, tensor in vae.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = tensor
    save_file(renamed, tmp_path / "legacy.safetensors")
    assert_same_outputs(vaegan.load(tmp_path / "legacy.safetensors", config=vae.config), vae)


def test_16_channel_file_without_config_needs_its_factors(tmp_path):
    vae = perturbed(AutoencoderKL(preset("flux", block_out_channels=(32, 64), layers_per_block=1)))
    save_file(vae.state_dict(), tmp_path / "ae.safetensors")

    with pytest.raises(FormatError, match=r"ae\.safetensors.*16 latent channels.*scaling_factor="):
        vaegan.load(tmp_path / "ae.safetensors")
    loaded = vaegan.load(tmp_path / "ae.safetensors", scaling_factor=0.3611, shift_factor=0.1159)
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (0.3611, 0.1159)
    assert not loaded.config.use_quant_conv
    assert_same_outputs(loaded, vae)


# ------------------------------------------------------------------------------------ refusals


@pytest.fixture
def folder(tmp_path) -> Path:
    return vaegan.save(small_vae(), tmp_path / "vae")


def rewrite_weights(folder: Path, edit) -> None:
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)


def test_missing_key_is_named(folder):
    rewrite_weights(folder, lambda t: t.pop("encoder.down_blocks.0.resnets.0.conv1.bias"))
    with pytest.raises(FormatError, match=r"(?s)diffusion_pytorch_model\.safetensors.*1 missing keys: "
                       r"encoder\.down_blocks\.0\.resnets\.0\.conv1\.bias"):
        vaegan.load(folder)


def test_unexpected_key_is_named(folder):
    rewrite_weights(folder, lambda t: t.update({"encoder.extra.weight": torch.zeros(1)}))
    with pytest.raises(FormatError, match=r"(?s)model\.safetensors.*unexpected keys: encoder\.extra\.weight"):
        vaegan.load(folder)


def test_wrong_shape_is_named(folder):
    rewrite_weights(folder, lambda t: t.update({"decoder.conv_out.bias": torch.zeros(5)}))
    with pytest.raises(FormatError, match=r"wrong shapes: decoder\.conv_out\.bias \(5,\) \(expected \(3,\)"):
        vaegan.load(folder)


def test_many_missing_keys_are_counted_not_all_listed(folder):
    rewrite_weights(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("decoder.up_blocks")])
    with pytest.raises(FormatError, match=r"\d+ missing keys: .* and \d+ more"):
        vaegan.load(folder)


def test_single_file_errors_use_the_files_own_names(tmp_path):
    vae = small_vae()
    path = vaegan.save(vae, tmp_path / "vae.safetensors", format="single-file")
    with safe_open(str(path), framework="pt") as file:
        tensors, metadata = {k: file.get_tensor(k) for k in file.keys()}, file.metadata()
    del tensors["decoder.up.1.upsample.conv.weight"]
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(FormatError, match=r"(?s)vae\.safetensors.*decoder\.up\.1\.upsample\.conv\.weight"):
        vaegan.load(path)


def test_truncated_safetensors_is_refused(tmp_path):
    path = vaegan.save(small_vae(), tmp_path / "vae.safetensors", format="single-file")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FormatError, match=r"vae\.safetensors is not a readable safetensors file"):
        vaegan.load(path)


def test_config_contradicting_weights_is_refused(folder):
    config_path = folder / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "latent_channels": 8}))
    with pytest.raises(FormatError, match=r"config\.json contradicts .*latent_channels=8 but the weights"):
        vaegan.load(folder)


def test_nonexistent_path_is_refused(tmp_path):
    with pytest.raises(FormatError, match=r"nowhere\.safetensors does not exist"):
        vaegan.load(tmp_path / "nowhere.safetensors")


def test_choosing_ema_weights_of_a_file_without_them_is_refused(tmp_path, folder):
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": small_vae().state_dict()}, ckpt)
    for path in (folder, ckpt):
        with pytest.raises(FormatError, match=r"not a vaegan training checkpoint: weights='ema'"):
            vaegan.load(path, weights="ema")


CALLS: list[str] = []


def _record_call() -> dict:
    CALLS.append("unpickled")
    return {}


class Payload:
    """Unpickling this would call `_record_call`: what a malicious checkpoint does with os.system."""

    def __reduce__(self):
        return (_record_call, ())


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    torch.save({"state_dict": small_vae().state_dict(), "payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(FormatError, match=r"evil\.ckpt is not a readable torch checkpoint"):
        vaegan.load(tmp_path / "evil.ckpt")
    assert CALLS == []


# ------------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_keep_the_users_umask(tmp_path, umask):
    """A VAE exported into a shared folder is readable by whoever the umask lets read it, as any file the user
    writes (the atomic writes' temporary files are private until they are renamed into place)."""
    previous = os.umask(umask)
    try:
        folder = vaegan.save(small_vae(), tmp_path / "vae")
        single = vaegan.save(small_vae(), tmp_path / "vae.safetensors", format="single-file")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for path in [*folder.iterdir(), single]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


@pytest.mark.parametrize("format, name", [("diffusers", "vae"), ("single-file", "vae.safetensors")])
def test_failed_save_leaves_the_previous_artifact(tmp_path, monkeypatch, format, name):
    good = small_vae()
    path = vaegan.save(good, tmp_path / name, format=format)
    before = digest(path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vaegan.formats.save, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        vaegan.save(perturbed(AutoencoderKL(good.config), seed=1), path, format=format)

    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left behind
    assert_same_outputs(vaegan.load(path), good)


def test_save_refuses_to_replace_a_folder_with_other_files(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError, match="model_index.json"):
        vaegan.save(small_vae(), tmp_path)
    assert (tmp_path / "unet").is_dir()


# ------------------------------------------------------------------------------------ FLUX.2

# FLUX.2-shaped (32 latent channels, quant convs, 2x2 statistics) but narrow, with a narrower decoder.
FLUX2_SMALL = preset(
    "flux2", block_out_channels=(32, 64), decoder_block_out_channels=(16, 32), norm_num_groups=8,
    layers_per_block=1, sample_size=32,
)


def with_statistics(vae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the `bn` buffers (the same names in ours and diffusers') values that prove they are carried."""
    generator = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=generator) + 0.5)
    vae.bn.num_batches_tracked.fill_(7)
    return vae


def small_flux2(**overrides) -> AutoencoderKL:
    return with_statistics(perturbed(AutoencoderKL(FLUX2_SMALL.replace(**overrides))))


def assert_same_statistics(ours: AutoencoderKL, reference: torch.nn.Module) -> None:
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours.bn, name), getattr(reference.bn, name)), name


def small_flux2_reference() -> torch.nn.Module:
    args = {k: v for k, v in diffusers_config(FLUX2_SMALL).items() if not k.startswith("_")}
    return with_statistics(perturbed(diffusers.AutoencoderKLFlux2(**args)))


@pytest.fixture(scope="module")
def full_flux2(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """diffusers' FLUX.2 VAE at the released size (its defaults) with random weights, saved once for both
    directions; not perturbed, to stay quick (the small model proves the mapping of every tensor)."""
    reference = with_statistics(diffusers.AutoencoderKLFlux2().eval())
    folder = tmp_path_factory.mktemp("flux2") / "vae"
    reference.save_pretrained(folder)
    return reference, folder


def test_flux2_preset_is_diffusers_flux2_default():
    with torch.device("meta"):
        ours, theirs = AutoencoderKL.from_preset("flux2"), diffusers.AutoencoderKLFlux2()
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours_shapes["bn.running_mean"] == (128,)  # 32 channels, patchified 2x2
    assert ours.num_parameters() == 84_046_115
    # Every constructor argument, as JSON writes it.
    theirs_config = json.loads(json.dumps({k: v for k, v in theirs.config.items() if not k.startswith("_")}))
    assert {k: diffusers_config(ours.config)[k] for k in theirs_config} == theirs_config


@pytest.mark.parametrize("size", ["small", "full"])
def test_flux2_diffusers_folder_loads_with_identical_outputs(request, tmp_path, size):
    if size == "full":
        reference, folder = request.getfixturevalue("full_flux2")
    else:
        reference, folder = small_flux2_reference(), tmp_path
        reference.save_pretrained(folder)

    vae = vaegan.load(folder)

    assert vae.config == (FLUX2_SMALL if size == "small" else preset("flux2"))
    assert_same_statistics(vae, reference)
    assert_same_outputs(vae, reference, atol=5e-5)


@pytest.mark.parametrize("size", ["small", "full"])
def test_flux2_saved_folder_loads_in_diffusers_without_warnings(request, tmp_path, size):
    vae = small_flux2() if size == "small" else vaegan.load(request.getfixturevalue("full_flux2")[1])
    vaegan.save(vae, tmp_path / "vae")

    with no_warnings_from_diffusers():
        reference = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "vae").eval()

    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2"
    assert config["decoder_block_out_channels"] == (None if size == "full" else [16, 32])
    assert reference.config.batch_norm_eps == 1e-4 and list(reference.config.patch_size) == [2, 2]
    assert_same_statistics(vae, reference)
    assert_same_outputs(vae, reference, atol=5e-5)


def test_flux2_pipeline_folder_loads_its_vae(tmp_path):
    reference = small_flux2_reference()
    reference.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text('{"_class_name": "Flux2Pipeline"}')
    vae = vaegan.load(tmp_path)
    assert_same_statistics(vae, reference)
    assert_same_outputs(vae, reference)


def test_flux2_single_file_has_black_forest_labs_names_and_round_trips_exactly(tmp_path):
    vae = small_flux2()
    path = vaegan.save(vae, tmp_path / "ae.safetensors", format="single-file")

    with safe_open(str(path), framework="pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
    # Black Forest Labs' AutoEncoder nests the quant convs in its encoder and decoder.
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.bias", "encoder.mid.attn_1.q.weight"} <= keys
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= keys
    assert not any(key.startswith(("quant_conv.", "post_quant_conv.")) or "_blocks." in key for key in keys)
    assert json.loads(metadata["vaegan_config"]) == vae.config.to_dict()

    loaded = vaegan.load(path)
    assert loaded.config == vae.config
    state, loaded_state = vae.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[key], loaded_state[key]) for key in state)
    # And back to the original naming: the same tensors and metadata (safetensors may order the header anew).
    again = vaegan.save(loaded, tmp_path / "again.safetensors", format="single-file")
    with safe_open(str(path), framework="pt") as first, safe_open(str(again), framework="pt") as second:
        assert first.metadata() == second.metadata() and set(first.keys()) == set(second.keys())
        assert all(torch.equal(first.get_tensor(key), second.get_tensor(key)) for key in first.keys())


def test_flux2_original_file_without_config_or_batch_count(tmp_path):
    # What Black Forest Labs ship: original names, no metadata; diffusers' conversion ignores the batch count.
    vae = small_flux2(block_out_channels=(32, 64), decoder_block_out_channels=(64, 96), norm_num_groups=32)
    vaegan.save(vae, tmp_path / "ours.safetensors", format="single-file")
    tensors = load_file(tmp_path / "ours.safetensors")
    del tensors["bn.num_batches_tracked"]
    save_file(tensors, tmp_path / "ae.safetensors")

    loaded = vaegan.load(tmp_path / "ae.safetensors")

    assert loaded.config == vae.config.replace(sample_size=loaded.config.sample_size)
    assert loaded.config.decoder_block_out_channels == (64, 96)
    assert loaded.bn.num_batches_tracked.item() == 0
    assert torch.equal(loaded.bn.running_var, vae.bn.running_var)
    assert_same_outputs(loaded, vae)


@pytest.mark.parametrize("format, name", [("diffusers", "vae"), ("single-file", "ae.safetensors")])
def test_flux2_missing_statistics_are_named(tmp_path, format, name):
    path = vaegan.save(small_flux2(), tmp_path / name, format=format)
    weights = path / "diffusion_pytorch_model.safetensors" if format == "diffusers" else path
    with safe_open(str(weights), framework="pt") as file:
        tensors, metadata = {k: file.get_tensor(k) for k in file.keys()}, file.metadata()
    quant_conv = "quant_conv.weight" if format == "diffusers" else "encoder.quant_conv.weight"  # the file's name
    del tensors["bn.running_var"], tensors[quant_conv]
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(FormatError, match=rf"(?s){weights.name}.*2 missing keys: .*{quant_conv}.*bn\.running_var"):
        vaegan.load(path)


def test_flux2_folder_cannot_hold_scalar_factors(tmp_path):
    vae = small_flux2(scaling_factor=0.5)
    with pytest.raises(ValueError, match=r"AutoencoderKLFlux2 .* cannot hold \{'scaling_factor': 0\.5\}"):
        vaegan.save(vae, tmp_path / "vae")
    assert not (tmp_path / "vae").exists()


# ------------------------------------------------------------------------------------ asymmetric decoders


def test_asymmetric_decoder_matches_diffusers_decoder(tmp_path):
    # diffusers' AutoencoderKL has one set of widths; its AutoencoderKLFlux2 builds the same decoder from
    # decoder_block_out_channels, so it checks a plain VAE's narrower decoder too (bn left at its defaults).
    vae = small_vae(decoder_block_out_channels=(16, 32))
    assert vae.bn is None
    reference = diffusers.AutoencoderKLFlux2(
        **{k: v for k, v in diffusers_config(FLUX2_SMALL.replace(latent_channels=4)).items() if k[0] != "_"}
    ).eval()
    reference.load_state_dict({**vae.state_dict(), **reference.bn.state_dict(prefix="bn.")})
    assert_same_outputs(vae, reference)


@pytest.mark.parametrize("metadata", [True, False])
def test_asymmetric_decoder_round_trips_through_a_single_file(tmp_path, metadata):
    vae = perturbed(AutoencoderKL(preset("sd", block_out_channels=(32, 64), decoder_block_out_channels=(64, 32),
                                         layers_per_block=1)))
    path = vaegan.save(vae, tmp_path / "vae.safetensors", format="single-file")
    if not metadata:  # then the widths come from the shapes
        save_file(load_file(path), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no config: the SD scaling factor is assumed, with a warning
        loaded = vaegan.load(path)
    assert loaded.config == vae.config.replace(sample_size=loaded.config.sample_size)
    assert loaded.decoder.conv_in.weight.shape == (32, 4, 3, 3)  # the decoder's last level, widest here
    assert_same_outputs(loaded, vae)


def test_asymmetric_decoder_is_refused_for_a_diffusers_autoencoderkl_folder(tmp_path):
    vae = small_vae(decoder_block_out_channels=(16, 32))
    with pytest.raises(ValueError, match=r"AutoencoderKL has no decoder_block_out_channels .*\[16, 32\]"):
        vaegan.save(vae, tmp_path / "vae")


def test_decoder_widths_equal_to_the_encoders_are_the_default():
    config = preset("sd", decoder_block_out_channels=(128, 256, 512, 512))
    assert config == preset("sd") and config.decoder_block_out_channels is None
    # A preset with other widths keeps a matching decoder.
    assert preset("sd", block_out_channels=(32, 64)).decoder_widths == (32, 64)
    with pytest.raises(ValueError, match="one width per level"):
        preset("sd", decoder_block_out_channels=(128, 256))


# ------------------------------------------------------------------------------------ per-channel statistics

LATENTS_MEAN = (-1.6574, 1.886, -1.383, 2.5155)
LATENTS_STD = (8.4927, 5.9022, 6.5498, 5.2299)


def test_latents_mean_and_std_survive_load_save_and_diffusers(tmp_path):
    args = {k: v for k, v in diffusers_config(CONFIGS["sd"]).items() if not k.startswith("_")}
    args.update(latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD, scaling_factor=0.5)
    reference = perturbed(diffusers.AutoencoderKL(**args))
    reference.save_pretrained(tmp_path / "theirs")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vae = vaegan.load(tmp_path / "theirs")
    assert (vae.config.latents_mean, vae.config.latents_std) == (LATENTS_MEAN, LATENTS_STD)

    vaegan.save(vae, tmp_path / "ours")
    with no_warnings_from_diffusers():
        reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours")
    assert tuple(reloaded.config.latents_mean) == LATENTS_MEAN
    assert tuple(reloaded.config.latents_std) == LATENTS_STD
    assert reloaded.config.scaling_factor == 0.5

    vaegan.save(vae, tmp_path / "vae.safetensors", format="single-file")
    assert vaegan.load(tmp_path / "vae.safetensors").config == vae.config


def test_latents_statistics_of_the_wrong_length_are_refused(folder):
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "latents_mean": [0.0] * 3, "latents_std": [1.0] * 3}))
    with pytest.raises(FormatError, match=r"config\.json is not a config .*latents_mean has 3 values"):
        vaegan.load(folder)


@pytest.mark.parametrize("shift, channels, drops_into", [
    (0.0, 4, "Stable Diffusion 1.x/2.x, SDXL and DiT pipelines"),
    (-0.84588, 4, "pipelines read only the scaling factor (for them, export with `--convention scale`)"),
    (0.1159, 16, "Stable Diffusion 3 and FLUX.1 pipelines"),
    (0.0, 8, "these 8-channel latents"),
])
def test_the_model_card_names_the_pipelines_that_read_the_export(tmp_path, shift, channels, drops_into):
    # SD and SDXL pipelines ignore a shift factor: a card must not send a shifted VAE to them.
    vae = AutoencoderKL(preset("mini", latent_channels=channels, shift_factor=shift, scaling_factor=2.0))
    card = model_card(vae, "my-vae")
    (line,) = [line for line in card.splitlines() if line.startswith("- **Drops into**")]
    assert drops_into in line
