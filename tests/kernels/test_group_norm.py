"""The GroupNorm + SiLU kernels equal PyTorch's ops, forward and backward, in both memory formats and every
dtype: run on the CPU through Triton's interpreter (tests/kernels/interpreted_cases.py), against float64."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vaegan.kernels import group_norm_silu
from vaegan.kernels.group_norm import kernels_apply, launches

CASES = Path(__file__).with_name("interpreted_cases.py")
# fp32 within 1e-5 of float64; fp16 and bf16 within a few of their own roundings (2^-11, 2^-8).
BOUNDS = {"torch.float32": 1e-5, "torch.float16": 3e-3, "torch.bfloat16": 2.5e-2}


@pytest.fixture(scope="module")
def interpreted() -> list[dict]:
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, str(CASES)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1", "VAEGAN_KERNELS": "triton"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_every_case_ran_the_kernels_not_the_fallback(interpreted):
    # statistics + apply forward, a reduction and an apply backward
    cases = interpreted["cases"]
    assert len(cases) == 9 and all(case["launches"] == 4 for case in cases), cases


@pytest.mark.parametrize("index", range(9))
def test_kernels_equal_the_pytorch_ops(interpreted, index):
    case = interpreted["cases"][index]
    # Where the input's own precision limits every method, as close as PyTorch's ops in that dtype get.
    forward_bound = max(BOUNDS[case["dtype"]], 1.5 * case["pytorch_forward"])
    backward_bound = max(BOUNDS[case["dtype"]], 1.5 * case["pytorch_backward"])
    assert case["forward"] < forward_bound and case["backward"] < backward_bound and case["same_layout"], case
    if case["name"] != "large mean, tiny variance":  # there the fp32 mean's own rounding is 1e-3 of the variance
        assert case["statistics"] < 1e-6, case  # fp32 statistics whatever the input's dtype


@pytest.mark.parametrize("layout", ["torch.contiguous_format", "torch.channels_last"])
def test_the_network_runs_on_the_kernels_when_asked(interpreted, layout):
    # VAEGAN_KERNELS=triton: every GroupNorm + SiLU of an encode, decode and backward goes through the kernels.
    network = interpreted["network"][layout]
    assert network["launches"] > 20 and network["forward"] < 1e-5 and network["backward"] < 1e-5, network


def test_without_cuda_or_the_interpreter_the_pytorch_ops_run():
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    if kernels_apply(x):
        pytest.skip("this process runs Triton's interpreter")
    before = sum(launches.values())
    out = group_norm_silu(x, 4, None, None, 1e-6, residual=x)
    torch.testing.assert_close(out, F.silu(F.group_norm(x, 4, eps=1e-6)) + x, rtol=0, atol=0)
    assert sum(launches.values()) == before
