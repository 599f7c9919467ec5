"""Small building blocks of the diffusion UNet: timestep embedding, N-d layer factories, normalisation.

Names follow Stable Diffusion's ``ldm/modules/diffusionmodules/util.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import checkpoint, zero_module

__all__ = [
    "timestep_embedding",
    "zero_module",
    "checkpoint",
    "conv_nd",
    "linear",
    "avg_pool_nd",
    "GroupNorm32",
    "normalization",
]


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first as in Stable Diffusion.

    ``f_i = max_period^(-i/half)`` for ``i = 0..half-1`` (``half = dim // 2``),
    ``emb[b] = [cos(t_b f_0), ..., cos(t_b f_{half-1}), sin(t_b f_0), ..., sin(t_b f_{half-1})]``,
    zero-padded by one column when ``dim`` is odd.

    Args:
        timesteps: [B] (float or integer).
        dim: embedding width.
        max_period: lowest frequency is ``1/max_period``.
        repeat_only: return ``timesteps`` repeated ``dim`` times instead (SD's option).
    Returns:
        [B, dim] float32.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor [B], got shape {tuple(timesteps.shape)}")
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d/2d/3d`` by ``dims``."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims} (1, 2 or 3)")


def linear(*args, **kwargs) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.AvgPool1d/2d/3d`` by ``dims``."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims} (1, 2 or 3)")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 when the input is half/bfloat16 (as SD's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            weight = None if self.weight is None else self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
        return super().forward(x)


def normalization(channels: int) -> nn.Module:
    """The UNet's normalisation layer: ``GroupNorm32(32, channels)`` (eps 1e-5)."""
    return GroupNorm32(32, channels)
