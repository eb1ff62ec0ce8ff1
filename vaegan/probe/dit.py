"""The diffusion probe's network: a small diffusion transformer that reads like DiT (Peebles & Xie 2023).

Latents (B, C, h, w) are cut into p x p patches, each patch becomes a token, a fixed 2-D sine-cosine position is
added, and blocks of self-attention and MLP run on the tokens. The timestep (and the class label, when the probe
is class-conditional) modulates every block through adaLN-Zero: the block's LayerNorms get a shift and scale,
and each residual branch a gate, all regressed from the conditioning vector and initialised to zero, so every
block starts as the identity. A final adaLN layer turns each token back into its patch.

The network predicts a velocity for flow matching (`vaegan.probe.flow`); it knows nothing of losses, optimizers or
VAEs. Its sizes are plain arguments: DiT-B (and LightningDiT-B) is width 768, depth 12, 12 heads; the CPU
default of `vaegan probe` is far smaller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) in [0, 1] -> (B, dim), t scaled to DiT's 0..1000 range."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * frequencies[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_position_embedding(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (height * width, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"width {dim} must be a multiple of 4 for 2-D sine-cosine positions")
    quarter = dim // 4
    frequencies = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    row_angles = rows.flatten()[:, None] * frequencies[None]  # (h*w, dim/4)
    col_angles = cols.flatten()[:, None] * frequencies[None]
    parts = [torch.sin(row_angles), torch.cos(row_angles), torch.sin(col_angles), torch.cos(col_angles)]
    return torch.cat(parts, dim=1).float()  # (h*w, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) normalised elsewhere, shifted and scaled per sample by (B, D) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """Timesteps (B,) -> conditioning vectors (B, width): a sinusoidal embedding through a two-layer MLP."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, width). Label `num_classes` is the "no class" of classifier-free guidance: the
    training data replaces a share of the labels by it, and guided sampling runs the model once with it."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, width)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, N, D), through PyTorch's fused scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """Attention and MLP, each behind a LayerNorm modulated by the conditioning (adaLN-Zero) and gated."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Tokens (B, N, D) -> patches (B, N, p * p * C), through a modulated LayerNorm."""

    def __init__(self, width: int, patch_size: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """A diffusion transformer on latents: (x_t (B, C, h, w), t (B,), labels (B,) or None) -> velocity (B, C, h, w).

    Args:
        channels: latent channels C.
        patch_size: side p of the latent patch that becomes one token; h and w must be multiples of it.
        width: token width (DiT-B: 768).
        depth: number of blocks (DiT-B: 12).
        heads: attention heads (DiT-B: 12).
        mlp_ratio: hidden width of the MLP over the token width (4 in DiT).
        num_classes: 0 for an unconditional model; otherwise labels 0..num_classes-1, and num_classes means
            "no class" (classifier-free guidance).
    """

    def __init__(self, channels: int, patch_size: int = 2, width: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: float = 4.0, num_classes: int = 0):
        super().__init__()
        self.channels, self.patch_size, self.num_classes = channels, patch_size, num_classes
        self.width = width
        self.patch_embed = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch_size, channels)
        self._positions: dict[tuple[int, int], torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, the patch embedding like a linear, N(0, 0.02) embeddings, and
        every adaLN modulation and the output layer at zero, so each block starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def position_embedding(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """(rows * cols, width), computed once per token grid (kept out of the state dict: it is fixed)."""
        key = (rows, cols)
        if key not in self._positions:
            self._positions[key] = sincos_position_embedding(self.width, rows, cols)
        return self._positions[key].to(device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
        rows, cols = height // p, width // p
        tokens = rearrange(self.patch_embed(x), "b d r c -> b (r c) d")  # (B, N, width)
        tokens = tokens + self.position_embedding(rows, cols, x.device).to(tokens.dtype)
        c = self.t_embedder(t)  # (B, width)
        if self.y_embedder is not None:
            if labels is None:
                raise ValueError("a class-conditional probe needs labels (num_classes means 'no class')")
            c = c + self.y_embedder(labels)
        for block in self.blocks:
            tokens = block(tokens, c)
        patches = self.final_layer(tokens, c)  # (B, N, p * p * C)
        return rearrange(patches, "b (r c) (p q ch) -> b ch (r p) (c q)", r=rows, c=cols, p=p, q=p)

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())
