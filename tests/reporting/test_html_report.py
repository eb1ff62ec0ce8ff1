"""report.html: what a folder holds is on the page, every image it references exists, and in a real headless
Chromium the reports of `vaegan eval` and `vaegan probe` load without errors, one table row per model, with a
working side-by-side zoom."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaegan
from vaegan.evaluate.run import evaluate
from vaegan.probe.job import ProbeJob
from vaegan.probe.run import probe
from vaegan.reporting.html import write_html_report

from browser import HeadlessChromium, find_chromium
from conftest import skimage_photos


def referenced_files(page: str) -> list[str]:
    """Every local path the page links to or shows (src and href, not anchors)."""
    return [value for value in re.findall(r"(?:src|href)='([^']+)'", page) if not value.startswith(("#", "http"))]


def write_png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)


def test_page_shows_what_the_folder_holds_including_sections_it_does_not_know(tmp_path):
    (tmp_path / "results.md").write_text(
        "# Reconstruction benchmark\n\n| model | PSNR ↑ | `x` |\n| --- | ---: | --- |\n| demo | 22.44 | a |\n"
        "| untrained | 11.02 | b |\n\n- a note with **bold** and <script>alert(1)</script>\n")
    summary = {
        "protocol": {"data": "kodak", "images": 24},
        "models": [{"name": "demo", "equivariance": {"rotate90_psnr": 21.5}, "spectrum": list(range(40))},
                   {"name": "untrained", "equivariance": {"rotate90_psnr": 9.0}, "spectrum": None}],
        "a_later_section": [{"step": 0, "loss": 2.0}, {"step": 10, "loss": 1.5}],
        "sheets": [{"index": 3, "image": "kodim04.png", "selected": "worst PSNR"}],
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    write_png(tmp_path / "spectra.png")
    write_png(tmp_path / "samples" / "demo-seed0.png")
    write_png(tmp_path / "sheets" / "00003_kodim04.png")
    for name in ("0-original", "1-demo", "1-demo.error", "2-untrained", "2-untrained.error"):
        write_png(tmp_path / "sheets" / "00003_kodim04" / f"{name}.png")
    for i in range(60):  # an image set, not figures: left out
        write_png(tmp_path / "images" / "class" / f"{i}.png")
        write_png(tmp_path / "flat" / f"{i}.png")

    page = write_html_report(tmp_path).read_text()
    assert "<title>Reconstruction benchmark</title>" in page
    results = re.search(r"<table id='results'>.*?</table>", page, flags=re.S)[0]
    assert re.findall(r"data-model='([^']+)'", results) == ["demo", "untrained"]
    assert "text-align:right" in results and "<code>x</code>" in results
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    for text in ("rotate90_psnr", "a_later_section", "<table class='records'>", "… (40 values)", "worst PSNR"):
        assert text in page, text
    files = referenced_files(page)
    assert "spectra.png" in files and "samples/demo-seed0.png" in files
    assert "sheets/00003_kodim04/2-untrained.error.png" in files
    assert not any(path.startswith(("images/", "flat/")) for path in files)
    assert all((tmp_path / path).is_file() for path in files), [p for p in files if not (tmp_path / p).is_file()]


def check_in_browser(browser: HeadlessChromium, report: Path) -> dict:
    page = browser.open(report)
    models = [model["name"] for model in json.loads((report.parent / "summary.json").read_text())["models"]]
    assert page.evaluate("Array.from(document.querySelectorAll('#results tbody tr')).map(r => r.dataset.model)") \
        == models
    images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && "
                           "i.naturalWidth > 0])")
    assert images and all(loaded for _, loaded in images), [src for src, loaded in images if not loaded]
    missing = [path for path in referenced_files(report.read_text()) if not (report.parent / path).is_file()]
    assert not missing, missing
    return {"page": page, "images": [src for src, _ in images]}


@pytest.mark.skipif(find_chromium() is None,
                    reason="no Chromium installed (apt-get install chromium); CI installs it and runs this test")
def test_eval_and_probe_reports_load_in_headless_chromium(assets, tmp_path):
    torch.manual_seed(0)
    for name in ("a", "b"):
        vaegan.save(vaegan.AutoencoderKL(vaegan.preset("mini")), tmp_path / name)
    photos = skimage_photos(tmp_path / "photos", 8)
    evaluate(models=[f"first={tmp_path / 'a'}", f"second={tmp_path / 'b'}"], data=str(photos),
             output=str(tmp_path / "eval"), resolution=64, batch_size=4, rfid=False, sheets=2, num_workers=0,
             progress=False)
    probe(ProbeJob(models=[f"first={tmp_path / 'a'}"], data=str(photos), output=str(tmp_path / "probe"),
                   resolution=32, width=32, depth=1, heads=2, steps=10, val_every=5, checkpoint_every=5,
                   samples=8, sampling_steps=2, distance="alex", progress=False))

    with HeadlessChromium.start(tmp_path / "profile") as browser:
        evaluated = check_in_browser(browser, tmp_path / "eval" / "report.html")
        assert "per_image.png" in evaluated["images"]
        assert any(src.endswith("1-first.error.png") for src in evaluated["images"])
        page = evaluated["page"]
        # Zoom one panel: every panel of that image follows; the error maps appear when asked for.
        transforms = page.evaluate("""(() => {
            const block = document.querySelector('.compare');
            const port = block.querySelector('.viewport'), box = port.getBoundingClientRect();
            port.dispatchEvent(new WheelEvent('wheel', {deltaY: -100, clientX: box.left + 50, clientY: box.top + 80,
                                                        bubbles: true, cancelable: true}));
            return Array.from(block.querySelectorAll('.layer')).map(layer => layer.style.transform);
        })()""")
        assert len(transforms) == 3 and len(set(transforms)) == 1 and "scale(1.25)" in transforms[0]
        visibility = page.evaluate("""(() => {
            const block = document.querySelector('.compare');
            const toggle = block.querySelector('.error-toggle');
            toggle.click();
            return getComputedStyle(block.querySelector('img.error')).visibility;
        })()""")
        assert visibility == "visible"
        assert page.errors == []

        probed = check_in_browser(browser, tmp_path / "probe" / "report.html")
        assert {"curves.png", "samples/first-seed0.png"} <= set(probed["images"])
        assert probed["page"].errors == []
