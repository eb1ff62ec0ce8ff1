"""VAEs named by hub name: read from a real huggingface_hub cache offline, and never a path sent to the hub."""

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError

import vaegan
from vaegan import AutoencoderKL, FormatError, preset
from vaegan.cli import main
from vaegan.evaluate.run import evaluate
from vaegan.formats import hub

REPO = "owner/tiny-vae"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DOWNLOAD = (
    f"hf download {REPO} config.json diffusion_pytorch_model.safetensors vae/config.json "
    "vae/diffusion_pytorch_model.safetensors"
)


def small_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(preset("mini", block_out_channels=(16, 32), layers_per_block=1)).eval()


def assert_same_weights(a: AutoencoderKL, b: AutoencoderKL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache in a fresh HF_HOME: `hub/models--owner--name/{refs/main, snapshots/<commit>/}`."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def snapshot(cache: Path, repo: str = REPO, commit: str = COMMIT) -> Path:
    """The snapshot folder of `repo` at `commit`, with refs/main pointing at it, as huggingface_hub lays it out."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return storage / "snapshots" / commit


def test_vae_at_the_repository_root_loads_offline(cache):
    vae = small_vae()
    vaegan.save(vae, snapshot(cache))
    assert_same_weights(vaegan.load(REPO), vae)


def test_pipeline_repository_loads_its_vae_subfolder(cache):
    vae = small_vae()
    folder = snapshot(cache)
    vaegan.save(vae, folder / "vae")
    (folder / "model_index.json").write_text('{"_class_name": "Flux2Pipeline"}')

    assert_same_weights(vaegan.load(REPO), vae)
    assert_same_weights(vaegan.load(REPO, subfolder="vae", revision=COMMIT), vae)


def test_only_a_half_precision_variant_in_the_cache(cache):
    vae = small_vae()
    folder = vaegan.save(vae, snapshot(cache) / "vae", dtype=torch.float16)
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    loaded = vaegan.load(REPO)
    assert loaded.encoder.conv_in.weight.dtype == torch.float32
    assert torch.equal(loaded.encoder.conv_in.weight, vae.encoder.conv_in.weight.half().float())


def test_offline_name_not_in_the_cache_says_what_was_tried_and_how_to_get_it(cache):
    with pytest.raises(FormatError) as error:
        vaegan.load(REPO)
    assert str(error.value) == (
        f"{REPO} is not a local path, and the Hugging Face cache at {cache} holds no VAE of it at revision main "
        "(tried config.json and vae/config.json; HF_HUB_OFFLINE is set, so nothing was downloaded). "
        f"Download it with `{DOWNLOAD}`, or unset HF_HUB_OFFLINE."
    )


def test_offline_config_without_weights_says_so(cache):
    folder = vaegan.save(small_vae(), snapshot(cache))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FormatError, match=r"\(tried config\.json \(there, but no weights file beside it\) and "
                       rf"vae/config\.json; .*`{re.escape(DOWNLOAD)}`"):
        vaegan.load(REPO)
    with pytest.raises(FormatError, match=rf"`hf download {REPO} vae/config\.json "
                       r"vae/diffusion_pytorch_model\.safetensors --revision v1`"):
        vaegan.load(REPO, subfolder="vae", revision="v1")


def test_a_root_config_without_weights_falls_back_to_the_vae_subfolder(cache):
    # A root config.json of something else (a transformers model, say) does not hide the pipeline's VAE.
    folder = snapshot(cache)
    vae = small_vae()
    vaegan.save(vae, folder / "vae")
    (folder / "config.json").write_text('{"model_type": "clip"}')
    assert_same_weights(vaegan.load(REPO), vae)


def test_a_local_path_wins_over_a_hub_name(cache, tmp_path, monkeypatch):
    vaegan.save(small_vae(seed=0), snapshot(cache))
    local = small_vae(seed=1)
    vaegan.save(local, tmp_path / REPO)
    monkeypatch.chdir(tmp_path)
    assert_same_weights(vaegan.load(REPO), local)


# A path object is a path, whatever it looks like.
@pytest.mark.parametrize(
    "path", ["./owner/vae", "owner/vae/x", "/owner/vae", "owner/vae.safetensors", "~/owner", Path(REPO)]
)
def test_a_path_that_does_not_exist_is_never_sent_to_the_hub(cache, monkeypatch, path):
    def refuse(*args, **kwargs):
        raise AssertionError("sent to the hub")

    monkeypatch.setattr(hub, "hf_hub_download", refuse)
    with pytest.raises(FormatError, match="does not exist"):
        vaegan.load(path)


def test_online_fetches_only_the_vae_files(cache, tmp_path, monkeypatch):
    # A stand-in for the hub (nothing here reaches the network): a pipeline repository, of which only
    # vae/config.json and the full-precision weights are to be downloaded.
    remote = tmp_path / "remote"
    vae = small_vae()
    vaegan.save(vae, remote / "vae")
    vaegan.save(small_vae(seed=1), remote / "transformer")
    (remote / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    (remote / "model_index.json").write_text("{}")
    requested = []

    def download(repo_id, filename, *, revision, cache_dir, local_files_only):
        assert (repo_id, local_files_only) == (REPO, False)
        requested.append(filename)
        if not (remote / filename).is_file():
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        target = snapshot(Path(cache_dir)) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((remote / filename).read_bytes())
        return str(target)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "hf_hub_download", download)

    assert_same_weights(vaegan.load(REPO), vae)
    assert requested == ["config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


def test_revision_applies_to_hub_names_only(tmp_path):
    vaegan.save(small_vae(), tmp_path / "vae")
    with pytest.raises(FormatError, match=r"is a local path: revision='v1' applies to hub names only"):
        vaegan.load(tmp_path / "vae", revision="v1")


def test_commands_name_a_vae_by_hub_name_offline(cache, assets, capsys):
    vae = small_vae()
    vaegan.save(vae, snapshot(cache) / "vae")
    main(["info", REPO, "--format", "json"])
    assert json.loads(capsys.readouterr().out)["parameters"] == vae.num_parameters()
    result = evaluate(models=[f"tiny={REPO}"], data=str(assets / "kodak"), resolution=64, max_images=1,
                      num_workers=0, lpips=(), rfid=False, progress=False)
    assert result.models[0].label == "tiny" and result.models[0].path == REPO and result.rows[0]["psnr"] > 5
