"""The README and the documentation site say only what is true: every Python block runs (with small random VAEs
where a page names a real one, on the CPU), and every command, recipe, script and module a page names exists."""

import io
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage.data import astronaut

import vaegan

from conftest import SHARED_ASSETS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# The record of one GPU run: its commands name the scripts as they were at that commit, and are not rewritten.
HISTORICAL = ROOT / "docs" / "gpu"


def page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def code_blocks(language: str) -> list[tuple[Path, int, str]]:
    """(page, index on the page, code) of every fenced block in `language` on every page."""
    found = []
    for page in PAGES:
        for index, code in enumerate(re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)):
            found.append((page, index, code))
    return found


def swap(code: str, old: str, new: str) -> str:
    """`code` with `old` replaced; `old` must be there, so an edited example fails here instead of running as
    something else."""
    assert old in code, f"the example no longer contains {old!r}: update tests/test_docs.py"
    return code.replace(old, new)


def save_random_vae(path: Path) -> None:
    """An untrained mini VAE (f4c4) where an example loads a real one."""
    torch.manual_seed(0)
    vaegan.save(vaegan.AutoencoderKL(vaegan.preset("mini")), path)


def save_photo(path: Path, size: int) -> None:
    Image.fromarray(np.ascontiguousarray(astronaut()[:size, :size])).save(path)


# ---- one runner per Python example: it prepares what the block expects, runs it, checks the results ----


def run_codec_example(code: str, tmp_path: Path, monkeypatch) -> None:
    save_random_vae(tmp_path / "out" / "sd-vae")
    save_photo(tmp_path / "photo.png", 128)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(swap(code, 'device="cuda"', 'device="cpu"'), namespace)
    assert namespace["latents"].shape == (1, 4, 32, 32)  # the mini VAE is f4c4
    assert namespace["latents"].dtype == torch.float32
    assert namespace["image"].size == (128, 128)


def run_exact_tiling_example(code: str, tmp_path: Path, monkeypatch) -> None:
    save_random_vae(tmp_path / "out" / "sd-vae")
    monkeypatch.chdir(tmp_path)
    # 96 px instead of 2048 (the mini VAE is f4), in 32-px tiles: three by three.
    code = swap(code, "torch.randn(1, 4, 256, 256)", "torch.randn(1, 4, 24, 24)")
    code = swap(code, "tile_size=128", "tile_size=32")
    torch.manual_seed(1)
    namespace: dict = {}
    exec(code, namespace)
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 24, 24)
    untiled = vaegan.Codec(vaegan.load(tmp_path / "out" / "sd-vae")).decode(latents)
    tiled = namespace["image"]
    assert tiled.shape == untiled.shape == (1, 3, 96, 96)
    psnr = 10 * torch.log10(4 / (tiled - untiled).pow(2).mean())  # images in [-1, 1]: a range of 2
    assert psnr > 60, f"fp16 stashes: {psnr:.1f} dB from the untiled decode"


def run_flux2_example(code: str, tmp_path: Path, monkeypatch) -> None:
    # A FLUX.2-shaped VAE (narrow, random) where the hub cache keeps black-forest-labs/FLUX.2-dev's vae/.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    storage = tmp_path / "hf" / "hub" / "models--black-forest-labs--FLUX.2-dev"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text("0" * 40)
    narrow = vaegan.preset("flux2", block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1)
    vaegan.save(vaegan.AutoencoderKL(narrow), storage / "snapshots" / ("0" * 40) / "vae")
    save_photo(tmp_path / "photo.png", 64)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["latents"].shape == (1, 128, 4, 4)  # 64 px: 8x8 latents of 32 channels, in 2x2 patches


def run_latent_dataset_example(code: str, tmp_path: Path, monkeypatch) -> None:
    from vaegan.latents.encode import encode_dataset

    save_random_vae(tmp_path / "vae")
    images = tmp_path / "images"
    images.mkdir()
    photo = astronaut()
    for i in range(6):
        Image.fromarray(np.ascontiguousarray(photo[i * 32:i * 32 + 96, i * 16:i * 16 + 128])).save(images / f"{i}.png")
    encode_dataset(tmp_path / "vae", images, tmp_path / "latents", crop=64, batch_size=4, num_workers=0,
                   device="cpu", progress=False)
    code = swap(code, '"/data/latents"', repr(str(tmp_path / "latents")))
    code = swap(code, "dataset.batch_sampler(64,", "dataset.batch_sampler(4,")
    code = swap(code, "num_workers=4", "num_workers=0")
    code = swap(code, "range(epochs)", "range(2)")
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["x"].shape[1:] == (4, 16, 16) and namespace["x"].dtype == torch.float32
    assert len(namespace["original_size"]) == len(namespace["x"])


def run_inception_conversion(code: str, tmp_path: Path, monkeypatch) -> None:
    # A stand-in for pytorch-fid's file: a state dict of the same kind, much smaller.
    state = {"fc.weight": torch.randn(1008, 16), "fc.bias": torch.randn(1008)}
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    converted = load_file(tmp_path / "inception_v3_features.safetensors")
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[name], state[name]) for name in state)


def run_save_and_load_example(code: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(code, {})
    assert printed.getvalue().split() == ["4", "4"]
    assert (tmp_path / "runs" / "untrained-mini" / "config.json").is_file()


def run_tiny_previewer_example(code: str, tmp_path: Path, monkeypatch) -> None:
    assets = SHARED_ASSETS
    if not (assets / "taesd").is_dir():
        pytest.skip(f"the TAEF2 weights are not at {assets / 'taesd'} (CI always has them)")
    (tmp_path / "models" / "vae_approx").mkdir(parents=True)
    shutil.copy(assets / "taesd" / "taef2_decoder.pth", tmp_path / "models" / "vae_approx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"latents": torch.randn(1, 128, 4, 6)}  # what a FLUX.2 sampler holds for a 64x96 image
    exec(code, namespace)
    assert namespace["taef2"].encoder is None and namespace["images"][0].size == (96, 64)


def run_tiny_shared_space_example(code: str, tmp_path: Path, monkeypatch) -> None:
    assets = SHARED_ASSETS
    if not (assets / "taesd").is_dir():
        pytest.skip(f"the TAEF2 weights are not at {assets / 'taesd'} (CI always has them)")
    narrow = vaegan.preset("flux2", block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1)
    vaegan.save(vaegan.AutoencoderKL(narrow), tmp_path / "models" / "flux2-vae")
    shutil.copytree(assets / "taesd", tmp_path / "models" / "taef2")
    save_photo(tmp_path / "photo.png", 64)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"vaegan": vaegan}
    exec(code, namespace)
    assert namespace["latents"].shape == (1, 128, 4, 4)
    assert namespace["quick"].shape == namespace["back"].shape == (1, 3, 64, 64)


# A marker each example contains (and no other) -> the runner that runs and checks it.
RUNNERS: dict[str, Callable] = {
    'vaegan.Codec(vae, device="cuda", dtype="bf16")': run_codec_example,
    'stash_dtype="fp16", stash_budget=': run_exact_tiling_example,
    'vaegan.load("black-forest-labs/FLUX.2-dev")': run_flux2_example,
    "vaegan.LatentDataset(": run_latent_dataset_example,
    "pt_inception-2015-12-05-6726825d.pth": run_inception_conversion,
    'vaegan.AutoencoderKL(vaegan.preset("mini"))': run_save_and_load_example,
    'taef2_decoder.pth")': run_tiny_previewer_example,
    'vaegan.load("models/taef2")': run_tiny_shared_space_example,
}
# Examples that cannot run here (a GPU, real weights), each with the reason. An example that is in neither
# table fails `test_python_example`, so no new example goes untested by accident.
NOT_RUN: dict[str, str] = {}


@pytest.mark.parametrize(
    "page, index, code",
    [pytest.param(page, index, code, id=f"{page_name(page)}:{index}") for page, index, code in code_blocks("python")],
)
def test_python_example(page, index, code, tmp_path, monkeypatch):
    where = f"{page_name(page)}, Python block {index}"
    skipped = [marker for marker in NOT_RUN if marker in code]
    if skipped:
        pytest.skip(f"{where}: {NOT_RUN[skipped[0]]}")
    runners = [runner for marker, runner in RUNNERS.items() if marker in code]
    assert len(runners) == 1, (
        f"{where} matches {len(runners)} runners in tests/test_docs.py: give it one (a marker in RUNNERS), or list "
        f"it in NOT_RUN with the reason it cannot run in a test"
    )
    runners[0](code, tmp_path, monkeypatch)


def test_every_example_is_on_a_page():
    """A runner whose example was deleted or rewritten would silently test nothing."""
    every_block = "\n".join(code for _, _, code in code_blocks("python"))
    missing = [marker for marker in [*RUNNERS, *NOT_RUN] if marker not in every_block]
    assert not missing, f"no Python block on any page contains {missing}: remove or update these markers"


# ---- what shell blocks and prose name ----


@pytest.fixture(scope="module")
def commands() -> set[str]:
    """The commands `python -m vaegan --help` lists."""
    listing = subprocess.run([sys.executable, "-m", "vaegan", "--help"], capture_output=True, text=True, check=True)
    return set(re.findall(r"^  ([a-z]+)  ", listing.stdout, flags=re.M))


def test_named_commands_exist(commands):
    assert {"fit", "validate", "export", "convert", "info", "eval", "encode", "decode", "probe"} <= commands
    named = []
    for page, _, code in code_blocks("bash"):
        named += [(page_name(page), name) for name in re.findall(r"(?<![\w./-])vaegan\s+([a-z][a-z_]*)\b", code)]
    for page in PAGES:  # and in code spans of the prose: `vaegan encode --model`
        named += [(page_name(page), name) for name in re.findall(r"`vaegan ([a-z][a-z_]*)\b", page.read_text())]
    assert named
    unknown = sorted({(where, name) for where, name in named if name not in commands})
    assert not unknown, f"`vaegan COMMAND` names that are no command: {unknown}"


def named_paths(pattern: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        if page.is_relative_to(HISTORICAL):
            continue
        found += [(page_name(page), path) for path in re.findall(pattern, page.read_text())]
    return found


def test_named_recipes_and_scripts_exist():
    named = named_paths(r"(?<![\w./-])((?:configs/[\w.-]+\.yaml)|(?:scripts|benchmarks)/[\w.-]+\.(?:py|sh))")
    assert any(path.startswith("configs/") for _, path in named)
    assert any(path.startswith("scripts/") for _, path in named)
    # The benchmark scripts are moving from scripts/benchmark_*.py to benchmarks/*.py; until the folder holds
    # them, only those paths are not checked.
    if not any((ROOT / "benchmarks").glob("*.py")):
        named = [(where, path) for where, path in named if not path.startswith("benchmarks/")]
    # Recipes listed by file name alone: "Recipes in `configs/`: `demo.yaml`, `sd-f8c4.yaml`, ..."
    named += [(where, f"configs/{name}") for where, name in named_paths(r"`([\w-]+\.yaml)`")]
    missing = sorted({(where, path) for where, path in named if not (ROOT / path).is_file()})
    assert not missing, f"pages name files that do not exist: {missing}"


def test_named_modules_and_tests_exist():
    named = named_paths(r"(?<![\w./-])((?:vaegan|tests)/[\w/]+\.py)")
    assert any(path.startswith("vaegan/") for _, path in named)
    missing = sorted({(where, path) for where, path in named if not (ROOT / path).is_file()})
    assert not missing, f"pages name modules or tests that do not exist: {missing}"


def slug(heading: str) -> str:
    """The anchor mkdocs' toc extension gives a heading."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", text))


def test_readme_links_resolve():
    """mkdocs --strict checks the links between pages of the site; the README is outside it."""
    links = re.findall(r"\]\((?!https?:)([^)#\s]+)(?:#([^)\s]+))?\)", (ROOT / "README.md").read_text())
    assert links
    for target, anchor in links:
        assert (ROOT / target).is_file(), f"README.md links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / target).read_text(), flags=re.M)
            assert anchor in {slug(heading) for heading in headings}, f"README.md: no heading #{anchor} in {target}"


def test_ci_runs_the_readme_test_command():
    readme_commands = re.findall(r"^pip install -e \"\.\[test\]\".*$", (ROOT / "README.md").read_text(), flags=re.M)
    ci = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()
    assert readme_commands == [ci[-1]]


def test_every_module_has_a_reference_page():
    """The API reference covers the whole package: a new module gets its `::: vaegan.x.y` line."""
    documented = set(re.findall(r"^::: (vaegan[\w.]*)$", "".join(
        page.read_text() for page in (ROOT / "docs" / "reference").glob("*.md")), flags=re.M))
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts)
               for path in (ROOT / "vaegan").glob("*/*.py") if path.name != "__init__.py"}
    assert not modules - documented, f"modules without a reference entry: {sorted(modules - documented)}"
