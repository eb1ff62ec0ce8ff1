"""GroupNorm, then SiLU, then a residual add, as Triton kernels with a fused backward.

    out = silu(group_norm(x) * weight + bias) + residual          (silu and residual optional)

A tensor (N, C, H, W) in NCHW or channels_last is read through its strides as (N, C, H*W), so both layouts take
the same kernels. Every kernel works on tiles of one (sample, group): [channels of the group, block of pixels].
The statistics are a split reduction, so a batch of one still has N * G * blocks programs: each tile gives its
count, mean and sum of squared deviations (two passes over the tile, so a large mean with a tiny variance loses
nothing to cancellation), and the tiles are merged with Chan's formula. Statistics and accumulations are fp32
whatever the input's dtype.

The kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set before
Triton is imported), which is how the tests check them without a GPU. Anywhere else `group_norm_silu` computes
the same thing with PyTorch's ops. `launches` counts the kernel launches, so a test can tell that the kernels ran.
"""

from __future__ import annotations

import os
from collections import Counter

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # a platform without Triton: the PyTorch ops below do the work
    triton = None

# Kernel launches by name, since the process started.
launches: Counter[str] = Counter()
# Pixels per tile: with the 16 channels of an SD group, tiles of 4096 values.
PIXEL_BLOCK = 256


def kernels_apply(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for `x`: on CUDA, or on the CPU under Triton's interpreter."""
    if triton is None:
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def group_norm_silu(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    residual: torch.Tensor | None = None, silu: bool = True,
) -> torch.Tensor:
    """silu(group_norm(x)) + residual, x (N, C, H, W); differentiable in x, weight, bias and residual."""
    if not kernels_apply(x):
        out = F.group_norm(x, num_groups, weight, bias, eps)
        out = F.silu(out) if silu else out
        return out if residual is None else out + residual
    return _GroupNormSiLU.apply(x, weight, bias, residual, num_groups, eps, silu)


def group_norm_statistics(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, m2) of each (sample, group) of x (N, C, H, W): the element count, the mean and the sum of
    squared deviations from it, fp32 (N, G); exact tiling merges such statistics over tiles with Chan's formula."""
    x = _strided(x)
    count, mean, m2 = _tile_statistics(x, num_groups)
    return _merge(count, mean, m2)


# ---- the autograd function ----


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, num_groups, eps, silu):
        x = _strided(x)
        c = x.shape[1]
        weight = torch.ones(c, device=x.device) if weight is None else weight
        bias = torch.zeros(c, device=x.device) if bias is None else bias
        count, mean, m2 = _merge(*_tile_statistics(x, num_groups))
        rstd = torch.rsqrt(m2 / count + eps)                                          # (N, G)
        out = torch.empty_like(x)
        residual_in = _strided(residual, like=x) if residual is not None else None
        _launch_apply(x, out, weight, bias, mean, rstd, residual_in, num_groups, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu, ctx.has_residual = num_groups, silu, residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_out = _strided(grad_out, like=x)
        n, c = x.shape[:2]
        groups = ctx.num_groups
        channels, pixels = c // groups, x.shape[2] * x.shape[3]
        blocks = triton.cdiv(pixels, PIXEL_BLOCK)
        sum_dxhat = torch.zeros(n, groups, blocks, device=x.device, dtype=torch.float32)
        sum_dxhat_xhat = torch.zeros_like(sum_dxhat)
        grad_weight = torch.zeros(c, device=x.device, dtype=torch.float32)
        grad_bias = torch.zeros_like(grad_weight)
        strides = (*_nchw_strides(x), *_nchw_strides(grad_out))
        _backward_reduce[(n * groups, blocks)](
            x, grad_out, weight, bias, mean, rstd, sum_dxhat, sum_dxhat_xhat, grad_weight, grad_bias,
            *strides, pixels, groups, blocks, channels,
            SILU=ctx.silu, CHANNEL_BLOCK=triton.next_power_of_2(channels), PIXEL_BLOCK=PIXEL_BLOCK,
        )
        launches["backward_reduce"] += 1
        count = channels * pixels
        mean_dxhat = sum_dxhat.sum(2) / count                                          # (N, G)
        mean_dxhat_xhat = sum_dxhat_xhat.sum(2) / count
        grad_x = torch.empty_like(x)
        _backward_apply[(n * groups, blocks)](
            x, grad_out, grad_x, weight, bias, mean, rstd, mean_dxhat, mean_dxhat_xhat,
            *strides, *_nchw_strides(grad_x), pixels, groups, channels,
            SILU=ctx.silu, CHANNEL_BLOCK=triton.next_power_of_2(channels), PIXEL_BLOCK=PIXEL_BLOCK,
        )
        launches["backward_apply"] += 1
        wanted = ctx.needs_input_grad
        return (
            grad_x if wanted[0] else None,
            grad_weight.to(weight.dtype) if wanted[1] else None,
            grad_bias.to(bias.dtype) if wanted[2] else None,
            grad_out if ctx.has_residual and wanted[3] else None,
            None, None, None,
        )


# ---- host side ----


def _strided(x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """x in NCHW or channels_last memory (any other layout is copied), matching `like`'s format when given."""
    if like is not None:
        channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
        return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _nchw_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """Strides of x (N, C, H, W) read as (N, C, H*W): the pixel stride is W's, which H's equals W times over in
    both memory formats."""
    return x.stride(0), x.stride(1), x.stride(3)


def _tile_statistics(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    channels, pixels = c // num_groups, h * w
    blocks = triton.cdiv(pixels, PIXEL_BLOCK)
    count = torch.empty(n, num_groups, blocks, device=x.device, dtype=torch.float32)
    mean, m2 = torch.empty_like(count), torch.empty_like(count)
    _statistics[(n * num_groups, blocks)](
        x, count, mean, m2, *_nchw_strides(x), pixels, num_groups, blocks, channels,
        CHANNEL_BLOCK=triton.next_power_of_2(channels), PIXEL_BLOCK=PIXEL_BLOCK,
    )
    launches["statistics"] += 1
    return count, mean, m2


def _merge(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Chan's merge of per-tile (count, mean, m2), (N, G, blocks) -> (N, G)."""
    total = count.sum(2)
    merged_mean = (count * mean).sum(2) / total
    merged_m2 = (m2 + count * (mean - merged_mean[..., None]) ** 2).sum(2)
    return total, merged_mean, merged_m2


def _launch_apply(x, out, weight, bias, mean, rstd, residual, num_groups, silu) -> None:
    n, c, h, w = x.shape
    channels, pixels = c // num_groups, h * w
    blocks = triton.cdiv(pixels, PIXEL_BLOCK)
    residual_strides = _nchw_strides(residual) if residual is not None else (0, 0, 0)
    _apply[(n * num_groups, blocks)](
        x, out, residual if residual is not None else x, weight, bias, mean, rstd,
        *_nchw_strides(x), *_nchw_strides(out), *residual_strides, pixels, num_groups, channels,
        SILU=silu, RESIDUAL=residual is not None,
        CHANNEL_BLOCK=triton.next_power_of_2(channels), PIXEL_BLOCK=PIXEL_BLOCK,
    )
    launches["apply"] += 1


# ---- the kernels: one program per (sample, group) and block of pixels ----

if triton is not None:

    @triton.jit
    def _tile(program, block, stride_n, stride_c, stride_p, pixels, groups, channels,
              CHANNEL_BLOCK: tl.constexpr, PIXEL_BLOCK: tl.constexpr):
        """Offsets [CHANNEL_BLOCK, PIXEL_BLOCK] of one tile, its mask and its channel indices."""
        sample, group = program // groups, program % groups
        channel = group * channels + tl.arange(0, CHANNEL_BLOCK)
        pixel = block * PIXEL_BLOCK + tl.arange(0, PIXEL_BLOCK)
        mask = (tl.arange(0, CHANNEL_BLOCK)[:, None] < channels) & (pixel[None, :] < pixels)
        offsets = sample * stride_n + channel[:, None] * stride_c + pixel[None, :] * stride_p
        return offsets, mask, channel

    @triton.jit
    def _statistics(x_ptr, count_ptr, mean_ptr, m2_ptr, stride_n, stride_c, stride_p, pixels,
                    groups, blocks, channels, CHANNEL_BLOCK: tl.constexpr, PIXEL_BLOCK: tl.constexpr):
        program, block = tl.program_id(0), tl.program_id(1)
        offsets, mask, _ = _tile(program, block, stride_n, stride_c, stride_p, pixels, groups,
                                 channels, CHANNEL_BLOCK, PIXEL_BLOCK)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
        deviation = tl.where(mask, x - mean, 0.0)
        m2 = tl.sum(tl.sum(deviation * deviation, axis=1), axis=0)
        index = program * blocks + block
        tl.store(count_ptr + index, count)
        tl.store(mean_ptr + index, mean)
        tl.store(m2_ptr + index, m2)

    @triton.jit
    def _normalized(x, channel, channel_mask, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, program):
        """(xhat, z) of a tile: the normalised values and their affine transform, fp32."""
        mean = tl.load(mean_ptr + program)
        rstd = tl.load(rstd_ptr + program)
        weight = tl.load(weight_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        return xhat, xhat * weight[:, None] + bias[:, None]

    @triton.jit
    def _apply(x_ptr, out_ptr, residual_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr,
               stride_n, stride_c, stride_p, out_stride_n, out_stride_c, out_stride_p,
               residual_stride_n, residual_stride_c, residual_stride_p, pixels, groups, channels,
               SILU: tl.constexpr, RESIDUAL: tl.constexpr, CHANNEL_BLOCK: tl.constexpr, PIXEL_BLOCK: tl.constexpr):
        program, block = tl.program_id(0), tl.program_id(1)
        offsets, mask, channel = _tile(program, block, stride_n, stride_c, stride_p, pixels, groups,
                                       channels, CHANNEL_BLOCK, PIXEL_BLOCK)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        channel_mask = tl.arange(0, CHANNEL_BLOCK) < channels
        _, z = _normalized(x, channel, channel_mask, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, program)
        if SILU:
            z = z * tl.sigmoid(z)
        if RESIDUAL:
            residual_offsets, _, _ = _tile(program, block, residual_stride_n, residual_stride_c, residual_stride_p,
                                           pixels, groups, channels, CHANNEL_BLOCK, PIXEL_BLOCK)
            z += tl.load(residual_ptr + residual_offsets, mask=mask, other=0.0).to(tl.float32)
        out_offsets, _, _ = _tile(program, block, out_stride_n, out_stride_c, out_stride_p, pixels,
                                  groups, channels, CHANNEL_BLOCK, PIXEL_BLOCK)
        tl.store(out_ptr + out_offsets, z.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_z(x, grad_out, channel, channel_mask, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, program,
                SILU: tl.constexpr):
        """(xhat, dL/dz) of a tile, through the SiLU: silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)."""
        xhat, z = _normalized(x, channel, channel_mask, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, program)
        if SILU:
            s = tl.sigmoid(z)
            grad_out = grad_out * s * (1.0 + z * (1.0 - s))
        return xhat, grad_out

    @triton.jit
    def _backward_reduce(x_ptr, grad_out_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, sum_dxhat_ptr,
                         sum_dxhat_xhat_ptr, grad_weight_ptr, grad_bias_ptr, stride_n, stride_c, stride_p,
                         grad_stride_n, grad_stride_c, grad_stride_p, pixels, groups, blocks, channels,
                         SILU: tl.constexpr, CHANNEL_BLOCK: tl.constexpr, PIXEL_BLOCK: tl.constexpr):
        program, block = tl.program_id(0), tl.program_id(1)
        offsets, mask, channel = _tile(program, block, stride_n, stride_c, stride_p, pixels, groups,
                                       channels, CHANNEL_BLOCK, PIXEL_BLOCK)
        grad_offsets, _, _ = _tile(program, block, grad_stride_n, grad_stride_c, grad_stride_p, pixels, groups,
                                   channels, CHANNEL_BLOCK, PIXEL_BLOCK)
        channel_mask = tl.arange(0, CHANNEL_BLOCK) < channels
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_out = tl.load(grad_out_ptr + grad_offsets, mask=mask, other=0.0).to(tl.float32)
        xhat, grad_z = _grad_z(x, grad_out, channel, channel_mask, weight_ptr, bias_ptr, mean_ptr, rstd_ptr,
                               program, SILU)
        xhat = tl.where(mask, xhat, 0.0)
        grad_z = tl.where(mask, grad_z, 0.0)
        weight = tl.load(weight_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
        grad_xhat = grad_z * weight[:, None]
        index = program * blocks + block
        tl.store(sum_dxhat_ptr + index, tl.sum(tl.sum(grad_xhat, axis=1), axis=0))
        tl.store(sum_dxhat_xhat_ptr + index, tl.sum(tl.sum(grad_xhat * xhat, axis=1), axis=0))
        tl.atomic_add(grad_weight_ptr + channel, tl.sum(grad_z * xhat, axis=1), mask=channel_mask)
        tl.atomic_add(grad_bias_ptr + channel, tl.sum(grad_z, axis=1), mask=channel_mask)

    @triton.jit
    def _backward_apply(x_ptr, grad_out_ptr, grad_x_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, mean_dxhat_ptr,
                        mean_dxhat_xhat_ptr, stride_n, stride_c, stride_p, grad_stride_n, grad_stride_c,
                        grad_stride_p, out_stride_n, out_stride_c, out_stride_p, pixels, groups,
                        channels, SILU: tl.constexpr, CHANNEL_BLOCK: tl.constexpr, PIXEL_BLOCK: tl.constexpr):
        program, block = tl.program_id(0), tl.program_id(1)
        offsets, mask, channel = _tile(program, block, stride_n, stride_c, stride_p, pixels, groups,
                                       channels, CHANNEL_BLOCK, PIXEL_BLOCK)
        grad_offsets, _, _ = _tile(program, block, grad_stride_n, grad_stride_c, grad_stride_p, pixels, groups,
                                   channels, CHANNEL_BLOCK, PIXEL_BLOCK)
        out_offsets, _, _ = _tile(program, block, out_stride_n, out_stride_c, out_stride_p, pixels,
                                  groups, channels, CHANNEL_BLOCK, PIXEL_BLOCK)
        channel_mask = tl.arange(0, CHANNEL_BLOCK) < channels
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_out = tl.load(grad_out_ptr + grad_offsets, mask=mask, other=0.0).to(tl.float32)
        xhat, grad_z = _grad_z(x, grad_out, channel, channel_mask, weight_ptr, bias_ptr, mean_ptr, rstd_ptr,
                               program, SILU)
        weight = tl.load(weight_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + program)
        # dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), the means over the group
        grad_x = rstd * (grad_z * weight[:, None] - tl.load(mean_dxhat_ptr + program)
                         - xhat * tl.load(mean_dxhat_xhat_ptr + program))
        tl.store(grad_x_ptr + out_offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
