"""benchmarks/encode.py runs end to end at a toy size from WebDataset tars: the plain diffusers loop, vaegan's
local launcher and Ray on this machine, side by side, with the same latents."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_encode_from_tars_with_ray_beside_the_plain_loop(assets, tmp_path):
    pytest.importorskip("ray")
    command = [sys.executable, str(ROOT / "benchmarks" / "encode.py"), "--images", str(assets / "bsds500" / "train"),
               "--source", "tars", "--ray", "--max-images", "12", "--shard-size", "6", "--resolution", "64",
               "--json", str(tmp_path / "e.json")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "e.json").read_text())
    assert [row["pipeline"] for row in report["results"]] == [
        "plain diffusers loop", "vaegan encode", "vaegan encode, ray"]
    assert all(row["images"] == 12 and row["seconds"] > 0 for row in report["results"])
    assert all(difference < 2e-3 for difference in report["max_abs_diff"].values())  # fp16 rounding
    assert "vaegan encode, ray " in result.stdout
