"""benchmarks/tiny.py runs end to end at a toy size: the student, its teacher and (for the classic variant)
diffusers' AutoencoderTiny, each encoding and decoding, with their costs."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_tiny_times_student_teacher_and_diffusers(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "tiny.py"), "--sizes", "64", "--repeats", "1",
               "--warmup", "0", "--json", str(tmp_path / "t.json")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(row["impl"], row["op"]): row for row in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert set(rows) == {(impl, op) for impl in ("student", "teacher", "diffusers AutoencoderTiny")
                         for op in ("encode", "decode")}
    assert all(row["images_per_s"] > 0 for row in rows.values())
    # TAESD's decoder against the SD VAE's: about 12.6x fewer multiply-adds per pixel.
    assert rows[("teacher", "decode")]["macs_per_pixel"] > 10 * rows[("student", "decode")]["macs_per_pixel"]
    assert "| student | decode | 64 |" in result.stdout
