"""Run by tests/kernels/test_group_norm.py in a process with TRITON_INTERPRET=1 (Triton reads it when the kernels
are defined): every case through the Triton kernels on the CPU and through PyTorch's ops in float64, printed as
one JSON line of relative errors and kernel launch counts."""

import json
import sys

import torch
import torch.nn.functional as F

from vaegan.kernels import group_norm_silu, group_norm_statistics
from vaegan.kernels.group_norm import launches

# (name, shape, groups, memory format, dtype, silu, residual, affine, offset, scale): odd sizes, batch 1, tiles
# that do not fill (3 channels per group, 260 pixels: two tiles of 256), large means with tiny variances.
CASES = [
    ("nchw fp32", (2, 32, 9, 7), 8, "nchw", torch.float32, True, True, True, 0.0, 1.0),
    ("channels_last fp32", (2, 32, 9, 7), 8, "channels_last", torch.float32, True, True, True, 0.0, 1.0),
    ("batch 1, odd groups, two tiles", (1, 48, 20, 13), 16, "nchw", torch.float32, True, False, True, 0.0, 1.0),
    ("batch 1 channels_last, two tiles", (1, 48, 20, 13), 16, "channels_last", torch.float32, True, True, True, 0, 1),
    ("large mean", (1, 16, 11, 5), 4, "nchw", torch.float32, True, False, True, 50.0, 1.0),
    ("large mean, tiny variance", (1, 16, 11, 5), 4, "nchw", torch.float32, True, False, True, 1000.0, 1e-3),
    ("no silu, no affine", (3, 8, 5, 5), 2, "nchw", torch.float32, False, False, False, 0.0, 1.0),
    ("fp16", (2, 32, 9, 7), 8, "nchw", torch.float16, True, True, True, 0.0, 1.0),
    ("bf16 channels_last", (2, 32, 9, 7), 8, "channels_last", torch.bfloat16, True, True, True, 0.0, 1.0),
]


def relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.detach().double() - reference).norm() / reference.norm().clamp(min=1e-30))


def pytorch_ops(inputs: list[torch.Tensor], grad: torch.Tensor, groups: int, silu: bool, affine: bool,
                residual: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """silu(group_norm(x)) + residual through PyTorch's ops, and the gradients of every input."""
    inputs = [tensor.requires_grad_() for tensor in inputs]
    x, rest = inputs[0], iter(inputs[1:])
    weight, bias = (next(rest), next(rest)) if affine else (None, None)
    out = F.group_norm(x, groups, weight, bias, 1e-6)
    out = F.silu(out) if silu else out
    out = out + next(rest) if residual else out
    return out.detach(), torch.autograd.grad(out, inputs, grad)


def run(case) -> dict:
    name, shape, groups, layout, dtype, silu, with_residual, affine, offset, scale = case
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    weight = torch.randn(channels, generator=generator).to(dtype) if affine else None
    bias = torch.randn(channels, generator=generator).to(dtype) if affine else None
    residual = torch.randn(shape, generator=generator).to(dtype) if with_residual else None
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    inputs = [t for t in (x, weight, bias, residual) if t is not None]

    ours_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ours_x, rest = ours_inputs[0], iter(ours_inputs[1:])
    ours_weight, ours_bias = (next(rest), next(rest)) if affine else (None, None)
    ours_residual = next(rest) if with_residual else None
    before = sum(launches.values())
    out = group_norm_silu(ours_x, groups, ours_weight, ours_bias, 1e-6, residual=ours_residual, silu=silu)
    ours_grads = torch.autograd.grad(out, ours_inputs, grad.to(dtype))
    launched = sum(launches.values()) - before

    reference, reference_grads = pytorch_ops([t.detach().double() for t in inputs], grad, groups, silu, affine,
                                             with_residual)
    # PyTorch's own ops in the input's dtype: where the input's precision limits every method (a large mean with
    # a tiny variance), the kernels are held to what PyTorch reaches.
    pytorch, pytorch_grads = pytorch_ops([t.detach() for t in inputs], grad.to(dtype), groups, silu, affine,
                                         with_residual)

    count, mean, m2 = group_norm_statistics(x, groups)
    grouped = x.double().reshape(shape[0], groups, -1)
    return {
        "name": name, "dtype": str(dtype), "launches": launched,
        "same_layout": out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last"),
        "forward": relative(out, reference),
        "backward": max(relative(o, r) for o, r in zip(ours_grads, reference_grads, strict=True)),
        "pytorch_forward": relative(pytorch, reference),
        "pytorch_backward": max(relative(o, r) for o, r in zip(pytorch_grads, reference_grads, strict=True)),
        "statistics": max(relative(mean, grouped.mean(2)), relative(m2 / count, grouped.var(2, unbiased=False))),
    }


def network() -> dict:
    """A small VAE's encode, decode and gradients with `norm_silu` on the kernels (VAEGAN_KERNELS=triton, set by
    the test) and on PyTorch's ops, in both memory formats."""
    import vaegan
    from vaegan.autoencoder import network as module

    torch.manual_seed(0)
    vae = vaegan.AutoencoderKL(vaegan.preset("mini", block_out_channels=(16, 32), norm_num_groups=8))
    x = torch.rand(2, 3, 24, 20) * 2 - 1
    results = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        outputs = {}
        for kernels in ("triton", "torch"):
            module.KERNELS = kernels
            vae.zero_grad()
            before = sum(launches.values())
            decoded = vae.decode(vae.encode(x.contiguous(memory_format=layout)).mode())
            decoded.square().mean().backward()
            grads = torch.cat([p.grad.flatten() for p in vae.parameters()])
            outputs[kernels] = (decoded.detach().double(), grads.double(), sum(launches.values()) - before)
        (ours, ours_grads, launched), (reference, reference_grads, _) = outputs["triton"], outputs["torch"]
        results[str(layout)] = {"launches": launched, "forward": relative(ours, reference),
                                "backward": relative(ours_grads, reference_grads)}
    return results


if __name__ == "__main__":
    print(json.dumps({"cases": [run(case) for case in CASES], "network": network()}))
    sys.stdout.flush()
