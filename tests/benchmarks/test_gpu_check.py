"""scripts/gpu_check.sh, the one script a borrowed GPU runs, runs end to end at toy sizes on the CPU, so that it
cannot rot between the rare sessions that have a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_runs_every_step_and_summarises(assets, tmp_path):
    out = tmp_path / "gpu"
    environment = os.environ | {
        "VAEGAN_GPU_CHECK_SMOKE": "1", "VAEGAN_WEIGHTS_DIR": str(assets / "lpips"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python` is this interpreter
    }
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], cwd=ROOT, env=environment,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"]["device"] == "cpu"
    assert [step["status"] for step in summary["steps"]] == ["0"] * 11, summary["steps"]
    assert {row["impl"] for row in json.loads((out / "tiny.json").read_text())["rows"]} == {
        "student", "teacher", "diffusers AutoencoderTiny"}
    # The rows with VAEGAN_KERNELS=triton (on this CPU the kernels do not apply; the script is what is checked).
    assert (out / "codec-bf16-kernels.json").is_file() and (out / "train-kernels.json").is_file()
    profile = (out / "profile-bf16.txt").read_text()
    assert all(f"== {impl} {op} 32²" in profile for impl in ("vaegan", "diffusers") for op in ("encode", "decode"))
    assert "aten::" in profile
    assert {(row["dtype"], row["op"]) for row in summary["codec"]} == {
        (dtype, op) for dtype in ("bf16", "fp16") for op in ("encode", "decode")}
    assert all(row["speedup"] > 0 and row["vaegan_images_per_s"] > 0 for row in summary["codec"])
    fallback = summary["fp16_fallback"]
    assert not fallback["plain_fp16_finite"] and fallback["codec_fp16_finite"] and fallback["warned"]
    assert [row["implementation"] for row in summary["training"]] == ["reference", "vaegan"]
    assert {row["pipeline"] for row in summary["encoding"]} == {
        "plain diffusers loop", "vaegan encode", "vaegan, device JPEGs"}
    assert "speedup" in result.stdout and "waiting for data" in result.stdout

    # A step that failed or ran out of time leaves its part empty; the summary still comes, naming it.
    (out / "encode.json").unlink()
    with open(out / "steps.tsv", "a") as steps:
        steps.write("encode\t124\t30\n")
    partial = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_summary.py"), str(out)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
    assert json.loads((out / "summary.json").read_text())["encoding"] == []
    assert "not measured: encode (124)" in partial.stdout
