"""GPU kernels for the network's hot spots, each with the PyTorch ops as its fallback: GroupNorm + SiLU
(+ residual), forward and backward."""

from vaegan.kernels.group_norm import group_norm_silu, group_norm_statistics

__all__ = ["group_norm_silu", "group_norm_statistics"]
