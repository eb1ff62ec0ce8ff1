"""`vaegan eval`: metrics against independent known values, the rFID pieces, and the report files of a real run."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data
from torch import nn

import vaegan
from vaegan.autoencoder.tiny import TinyAutoencoder
from vaegan.cli import main
from vaegan.evaluate.run import evaluate, fixed_sheet_indices, load_metric_networks
from vaegan.formats.specs import ModelSpec
from vaegan.metrics.distribution import FeatureMoments, frechet_distance
from vaegan.metrics.reconstruction import latent_bits_per_pixel, ms_ssim, psnr, ssim
from vaegan.pretrained.inception import INCEPTION_FILE, InceptionFeatures, MissingInceptionWeights, build_inception
from vaegan.pretrained.inception import resolve_variant as resolve_inception_variant

from conftest import skimage_photos


def _photo() -> torch.Tensor:
    return torch.from_numpy(data.astronaut()[::2, ::2].copy()).permute(2, 0, 1)[None]  # (1, 3, 256, 256) uint8


def _noisy(image: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (image.float() + noise).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture
def offline_torchvision(tmp_path, monkeypatch):
    """An empty torchvision cache and no download: only files can provide weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url, *args, **kwargs):
        raise OSError(f"offline test: no download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """Random pytorch-fid-variant Inception weights (the real ones are not available offline).

    Kaiming-normal convolutions keep activations alive through 90 layers, so features differ between images.
    """
    torch.manual_seed(0)
    net = build_inception("pytorch-fid")
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


# ---- metrics ----


def test_psnr_of_a_known_noise_level():
    # Gaussian noise of sigma 8 on mid-grey, never clipped; rounding adds uniform noise of variance 1/12.
    grey = torch.full((1, 3, 256, 256), 128, dtype=torch.uint8)
    expected = 10 * math.log10(255**2 / (8**2 + 1 / 12))  # 30.06 dB
    assert psnr(grey, _noisy(grey, 8.0)).item() == pytest.approx(expected, abs=0.05)


def test_ssim_and_ms_ssim_of_identical_images_are_one():
    photo = _photo()
    assert ssim(photo, photo).item() == pytest.approx(1.0, abs=1e-6)
    assert ms_ssim(photo, photo).item() == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim_falls_as_noise_grows():
    photo = _photo()
    values = [ms_ssim(photo, _noisy(photo, sigma)).item() for sigma in (2, 5, 10, 20, 40)]
    assert values == sorted(values, reverse=True) and values[0] < 1.0 and values[-1] > 0.0


def test_ms_ssim_matches_pytorch_msssim():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    photo = _photo()[..., :200, :171]  # odd width: the pooling pads odd sides, as the reference does
    noisy = torch.cat([_noisy(photo, 10.0, seed=1), _noisy(photo, 30.0, seed=2)])
    reference = pytorch_msssim.ms_ssim(
        photo.double().expand(2, -1, -1, -1), noisy.double(), data_range=255, size_average=False
    )
    assert ms_ssim(photo.expand(2, -1, -1, -1), noisy).tolist() == pytest.approx(reference.tolist(), abs=1e-5)


def test_ms_ssim_needs_161_pixels():
    photo = _photo()
    assert ms_ssim(photo[..., :161, :161], photo[..., :161, :161]).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 161x161.*160x256"):
        ms_ssim(photo[..., :160, :], photo[..., :160, :])


def test_lpips_of_the_reference_patches_through_the_evaluation_networks(assets):
    folder = assets / "lpips" / "examples"
    ref, p0, p1 = (
        torch.from_numpy(np.array(Image.open(folder / f"ex_{name}.png").convert("RGB"))).permute(2, 0, 1)[None]
        .float() / 127.5 - 1.0
        for name in ("ref", "p0", "p1")
    )
    networks, inception, note = load_metric_networks(("alex",), False, None, "auto", torch.device("cpu"))
    assert inception is None and "no-rfid" in note
    distances = networks["alex"](torch.cat([ref, ref]), torch.cat([p0, p1]))
    assert distances.tolist() == pytest.approx([0.722, 0.138], abs=1e-3)


def test_bits_per_pixel_of_the_latent():
    # SD's f8c4 latent of a 256^2 image: 4 x 32 x 32 values.
    assert latent_bits_per_pixel((4, 32, 32), (256, 256), torch.float16) == 1.0
    assert latent_bits_per_pixel((4, 32, 32), (256, 256), torch.float32) == 2.0
    assert latent_bits_per_pixel((16, 32, 32), (256, 256), torch.bfloat16) == 4.0


# ---- rFID ----


def test_frechet_distance_of_gaussians_with_known_covariances():
    # Covariances sharing eigenvectors commute, so d^2 = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    a = torch.tensor([4.0, 1.0, 0.25, 9.0, 2.0, 0.0], dtype=torch.float64)  # one zero variance: rank-deficient
    b = torch.tensor([1.0, 1.0, 1.0, 4.0, 0.5, 3.0], dtype=torch.float64)
    mean_a, mean_b = torch.zeros(6, dtype=torch.float64), torch.arange(6, dtype=torch.float64)
    expected = (mean_a - mean_b).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    covariance_a, covariance_b = rotation @ torch.diag(a) @ rotation.T, rotation @ torch.diag(b) @ rotation.T
    # The zero variance costs precision: sqrt of an eigenvalue of 1e-16 (rounding) is 1e-8.
    assert frechet_distance(mean_a, covariance_a, mean_b, covariance_b) == pytest.approx(expected.item(), abs=1e-6)
    assert frechet_distance(mean_a, covariance_a, mean_a, covariance_a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 40, 8, generator=generator, dtype=torch.float64)
    moments_x, moments_y = FeatureMoments(), FeatureMoments()
    for chunk in x.split(7):
        moments_x.update(chunk)
    moments_y.update(y * 2 + 1)
    mean_x, covariance_x = moments_x.mean_and_covariance()
    mean_y, covariance_y = moments_y.mean_and_covariance()
    torch.testing.assert_close(covariance_x, torch.cov(x.T))
    root = scipy.linalg.sqrtm(covariance_x.numpy() @ covariance_y.numpy()).real  # pytorch-fid's formula
    expected = ((mean_x - mean_y) ** 2).sum().item() + np.trace(covariance_x.numpy() + covariance_y.numpy() - 2 * root)
    assert frechet_distance(mean_x, covariance_x, mean_y, covariance_y) == pytest.approx(expected, rel=1e-9)


def test_missing_inception_weights_name_the_file(tmp_path, monkeypatch, offline_torchvision):
    monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(MissingInceptionWeights, match=f"{INCEPTION_FILE}.*VAEGAN_WEIGHTS_DIR.*--inception_weights"):
        InceptionFeatures()
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        InceptionFeatures(tmp_path / "nowhere.safetensors")


def test_inception_weights_load_and_give_pool3_features(inception_file):
    features = InceptionFeatures(inception_file)
    assert features.variant == "pytorch-fid"  # told apart by fc.weight's 1008 rows
    out = features(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.shape == (2, 2048) and out.std(0).mean() > 0
    with pytest.raises(ValueError, match="odd.safetensors.*999 rows"):
        resolve_inception_variant("auto", {"fc.weight": torch.zeros(999, 2048)}, "odd.safetensors")


# ---- the run and its report ----


def test_model_labels_and_fixed_sheets(tmp_path):
    (tmp_path / "vae.safetensors").touch()
    assert ModelSpec.parse(str(tmp_path / "vae.safetensors")) == ModelSpec("vae", str(tmp_path / "vae.safetensors"))
    assert ModelSpec.parse("ours=runs/x/vae/") == ModelSpec("ours", "runs/x/vae/")
    assert ModelSpec.parse("out/sd-vae/") == ModelSpec("sd-vae", "out/sd-vae/")
    assert fixed_sheet_indices(3, 24) == [0, 12, 23] and fixed_sheet_indices(5, 2) == [0, 1]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two random tiny VAEs in two formats: a diffusers folder and a single file."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    first = vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), folder / "first", format="diffusers")
    torch.manual_seed(1)
    second = vaegan.save(vaegan.AutoencoderKL.from_preset("mini"), folder / "second.safetensors", format="single-file")
    return first, second


def test_two_models_in_one_run_write_a_report_that_parses(assets, two_models, inception_file, tmp_path, capsys):
    first, second = two_models
    output = tmp_path / "report"
    main([
        "eval", "--models+", f"ours={first}", "--models+", str(second), "--data", str(assets / "kodak"),
        "--resolution", "176", "--max_images", "3", "--batch_size", "2", "--num_workers", "0", "--sheets", "2",
        "--inception_weights", str(inception_file), "--output", str(output),
    ])
    printed = capsys.readouterr().out
    assert "| ours |" in printed and "| second |" in printed

    with (output / "per_image.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6 and {row["model"] for row in rows} == {"ours", "second"}
    assert {row["image"] for row in rows} == {"kodim01.png", "kodim02.png", "kodim03.png"}
    assert all(0 <= float(row["ms_ssim"]) < 1 and 0 < float(row["lpips_alex"]) for row in rows)

    summary = json.loads((output / "summary.json").read_text())
    assert summary["protocol"]["images"] == 3 and summary["protocol"]["resolution"] == 176
    ours, other = summary["models"]
    psnr_ours = [float(row["psnr"]) for row in rows if row["model"] == "ours"]
    assert ours["metrics"]["psnr"]["mean"] == pytest.approx(np.mean(psnr_ours), abs=1e-4)
    assert ours["latent"]["shape"] == [4, 44, 44] and ours["latent"]["bits_per_pixel"] == 8.0
    assert len(ours["latent"]["raw_channel_std"]) == 4
    assert ours["rfid"] > 0 and other["rfid"] > 0 and "pytorch-fid" in summary["metrics"]["rfid"]
    assert "biased" in summary["metrics"]["rfid_note"]

    # The sheets: one fixed image (the first) and the first model's worst by PSNR.
    worst = min((row for row in rows if row["model"] == "ours"), key=lambda row: float(row["psnr"]))["image"]
    assert {sheet["image"] for sheet in summary["sheets"]} == {"kodim01.png", worst}
    sheets = sorted((output / "sheets").glob("*.png"))
    assert len(sheets) == len(summary["sheets"])
    with Image.open(sheets[0]) as sheet:
        assert sheet.width == 3 * (352 + 4) + 4  # original + two models; 176-px crops are shown at 2x
    table = (output / "results.md").read_text()
    assert table.count("| ours |") == 2 and "LPIPS-alex" in table  # the reconstruction and the diagnostics tables
    with Image.open(output / "per_image.png") as plot:
        assert plot.width > 400

    # The latent diagnostics: per image in the CSV, aggregated in summary.json, a table and one spectra plot.
    assert all(float(row["rotation_90_psnr"]) > 0 and float(row["scale_2x_lpips_alex"]) > 0 for row in rows)
    assert all(float(row["noise_0.3_psnr"]) < float(row["noise_0.1_psnr"]) for row in rows)
    diagnostics = ours["diagnostics"]
    half = [float(row["scale_2x_psnr"]) for row in rows if row["model"] == "ours"]
    assert diagnostics["equivariance"]["scale_2x"]["psnr"]["mean"] == pytest.approx(np.mean(half), abs=1e-4)
    assert set(diagnostics["equivariance"]["rotation_90"]) == {"psnr", "lpips_alex"}
    assert set(diagnostics["noise_robustness"]) == {"0.1", "0.3"}
    spectrum = diagnostics["spectrum"]
    assert len(spectrum["frequencies"]) == len(spectrum["latent"]) == len(spectrum["image"]) == 22  # 44 / 2 rings
    assert 0 < spectrum["image_high_frequency_share"] < 1 and 0 < spectrum["latent_high_frequency_share"] < 1
    correlation = np.array(ours["latent"]["channel_correlation"])
    assert correlation.shape == (4, 4) and np.allclose(np.diag(correlation), 1.0)
    assert {"shift", "scale"} <= set(ours["latent"]["suggested_factors"])
    assert "## Latent diagnostics" in table and table.count("| second |") == 2
    with Image.open(output / "spectra.png") as plot:
        assert plot.width > 400


def test_small_images_and_no_inception_weights_give_null_with_reasons(
    assets, two_models, tmp_path, monkeypatch, offline_torchvision
):
    monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(assets / "lpips"))  # alex, but no Inception file
    first, _ = two_models
    result = evaluate(models=[str(first)], data=str(assets / "kodak"), resolution=64, max_images=2, num_workers=0,
                      diagnostics=False, progress=False)
    from vaegan.evaluate.report import write_report

    write_report(result, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    metrics = summary["models"][0]["metrics"]
    assert metrics["ms_ssim"] is None and "161x161" in summary["metrics"]["ms_ssim"]
    assert summary["models"][0]["rfid"] is None and INCEPTION_FILE in summary["metrics"]["rfid_note"]
    assert metrics["psnr"]["mean"] > 0 and metrics["lpips_alex"]["mean"] > 0
    with (tmp_path / "per_image.csv").open() as file:
        assert [row["ms_ssim"] for row in csv.DictReader(file)] == ["", ""]
    assert summary["models"][0]["diagnostics"] is None and not (tmp_path / "spectra.png").exists()


def test_a_missing_lpips_backbone_stops_before_any_work(two_models, tmp_path, monkeypatch, offline_torchvision):
    monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="vgg16_features.safetensors"):
        evaluate(models=[str(two_models[0])], data="/nonexistent/images", lpips=("vgg",), progress=False)


def test_images_too_small_for_the_protocol_are_skipped_as_encode_refuses_them(two_models, tmp_path):
    # A 1x1 image upscaled to 64^2 would score the upscaling: eval skips it and says so, as encode refuses it.
    images = skimage_photos(tmp_path / "images", 2)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(images / "dot.png")
    Image.new("RGB", (40, 31), (20, 30, 200)).save(images / "small.png")  # 31 < 64 / 2
    result = evaluate(models=[str(two_models[0])], data=str(images), resolution=64, lpips=(), rfid=False,
                      num_workers=0, diagnostics=False, progress=False)
    assert result.num_images == 2
    assert sorted(Path(skip[0]).name for skip in result.skipped) == ["dot.png", "small.png"]
    kept = evaluate(models=[str(two_models[0])], data=str(images), resolution=64, lpips=(), rfid=False, min_size=30,
                    num_workers=0, diagnostics=False, progress=False)
    assert kept.num_images == 3


def test_tiny_autoencoders_sit_beside_vaes_and_decode_their_latents(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("VAEGAN_WEIGHTS_DIR", str(assets / "lpips"))
    torch.manual_seed(0)
    flux2_shaped = vaegan.save(vaegan.AutoencoderKL.from_preset(
        "mini", block_out_channels=(32, 64, 128, 128), latent_channels=32, patch_size=(2, 2)), tmp_path / "teacher")
    taef2 = str(assets / "taesd")
    result = evaluate(models=[taef2, f"preview={flux2_shaped}+{taef2}", str(flux2_shaped)], data=str(assets / "kodak"),
                      resolution=128, max_images=2, num_workers=0, lpips=("alex",), rfid=False, diagnostics=False,
                      progress=False)
    psnr = {model.label: model for model in result.models}
    assert list(psnr) == ["taesd", "preview", "teacher"]
    rows = {(row["model"], row["image"]): row["psnr"] for row in result.rows}
    # TAEF2 reconstructs Kodak well; the latents of a random teacher it decodes to a blur of grey.
    assert min(value for (model, _), value in rows.items() if model == "taesd") > 20
    assert max(value for (model, _), value in rows.items() if model == "preview") < 18
    assert psnr["preview"].parameters == (sum(p.numel() for p in vaegan.load(flux2_shaped).encoder.parameters())
                                          + sum(p.numel() for p in vaegan.load(taef2).decoder.parameters()))
    with pytest.raises(ValueError, match=r"makes 128-channel latents at 1/8, but .* decodes 16 channels"):
        taesd3_shaped = vaegan.save(TinyAutoencoder.from_preset("taesd", latent_channels=16), tmp_path / "t16")
        evaluate(models=[f"{flux2_shaped}+{taesd3_shaped}"], data=str(assets / "kodak"), resolution=64, max_images=1,
                 num_workers=0, lpips=(), rfid=False, progress=False)
