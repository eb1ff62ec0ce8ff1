"""benchmarks/tiling.py runs end to end at a toy size: its exact row equals the untiled decode, and its
profile names each row's operators."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_tiling_measures_exactness_and_profiles_each_row(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "tiling.py"), "--arch", "mini", "--size", "64",
               "--tile", "32", "--repeats", "1", "--impls", "untiled", "exact", "--json", str(tmp_path / "t.json"),
               "--profile", str(tmp_path / "profile.txt")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["row"]: row for row in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert set(rows) == {"untiled", "exact:none"}
    assert rows["exact:none"]["psnr_db"] >= 60  # equal up to float32 rounding, through the script's own pipeline
    # No budget: every activation is kept, nothing recomputed but the halos' few pixels.
    assert rows["exact:none"]["rounds"][0]["macs_vs_untiled"] == pytest.approx(1.0, abs=1e-3)
    profile = (tmp_path / "profile.txt").read_text()
    untiled, exact = profile.split("== exact:none")
    assert untiled.startswith("== untiled") and "aten::mkldnn_convolution" in untiled
    assert "aten::mkldnn_convolution" in exact and "aten::copy_" in exact
