"""Building blocks of the streaming transformer: layer scale, norms, sinusoidal and rotary positions."""

from __future__ import annotations

import math

import torch
from torch import nn


class LayerScale(nn.Module):
    """Per-channel learned scale on a residual branch (key ``scale``)."""

    def __init__(self, dim: int, init: float, device=None, dtype=None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class RMSNorm(nn.Module):
    """RMS normalisation with a learned gain ``alpha`` [1, 1, D]; optionally computed in float32."""

    def __init__(self, dim: int, eps: float, in_float32: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.in_float32 = in_float32
        self.alpha = nn.Parameter(torch.ones((1, 1, dim), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() if self.in_float32 else x
        inv_rms = torch.rsqrt(torch.mean(y * y, dim=-1, keepdim=True) + self.eps)
        return (y * (self.alpha.to(y.dtype) * inv_rms)).to(x.dtype)


def make_norm(kind: str, dim: int, device=None, dtype=None) -> nn.Module:
    """The normalisation layer named by a Kyutai config (``norm`` key)."""
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=1e-5, device=device, dtype=dtype)
    if kind == "rms_norm":
        return RMSNorm(dim, eps=1e-5, in_float32=False, device=device, dtype=dtype)
    if kind == "rms_norm_f32":
        return RMSNorm(dim, eps=1e-8, in_float32=True, device=device, dtype=dtype)
    raise ValueError(f"unsupported norm {kind!r}")


def sin_embedding(positions: torch.Tensor, dim: int, max_period: float, dtype) -> torch.Tensor:
    """Sinusoidal embedding: positions [B, T] -> [B, T, dim] (cosines, then sines)."""
    half = dim // 2
    scale = torch.arange(half, device=positions.device, dtype=torch.float32) / (half - 1)
    phase = positions.to(torch.float32)[..., None] / (max_period ** scale)  # [B, T, half]
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1).to(dtype)


def rope_rotation(positions: torch.Tensor, head_dim: int, max_period: float):
    """Cosines and sines of the rotary embedding: positions [B, T] -> 2 x [B, 1, T, Dh/2]."""
    pairs = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    inv_freq = torch.exp(pairs * (-math.log(max_period) * 2.0 / head_dim))  # [Dh/2]
    angle = positions.to(torch.float32)[:, None, :, None] * inv_freq  # [B, 1, T, Dh/2]
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x [..., B, H, T, Dh]."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, H, T, Dh/2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
