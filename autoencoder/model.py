"""Encoder and decoder of the KL autoencoder, with Stable Diffusion's module names.

The layout follows CompVis' ``ldm/modules/diffusionmodules/model.py`` so that the ``first_stage_model.*``
weights of a Stable Diffusion checkpoint load unchanged::

    encoder.conv_in
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}   i = 0 .. len(ch_mult)-1
    encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}                     only at attn_resolutions
    encoder.down.{i}.downsample.conv                                    all levels but the last
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out
    decoder.conv_in, decoder.mid.{block_1,attn_1,block_2}
    decoder.up.{i}.block.{j} (num_res_blocks + 1 blocks), decoder.up.{i}.attn.{j}
    decoder.up.{i}.upsample.conv                                        all levels but 0
    decoder.norm_out, decoder.conv_out

``decoder.up`` is indexed like ``encoder.down``: ``up[0]`` works at full resolution and
``up[len(ch_mult) - 1]`` at the lowest one, although the decoder runs them from the last to the first.

Shapes for ``ch_mult`` of length L (f = 2 ** (L - 1) is the down-sampling factor):
``Encoder: [B, in_channels, H, W] -> [B, (2 if double_z else 1) * z_channels, H / f, W / f]``,
``Decoder: [B, z_channels, h, w] -> [B, out_ch, h * f, w * f]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")


def normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6) as in SD; ``channels`` must be a multiple of 32."""
    if channels % 32 != 0:
        raise ValueError(f"GroupNorm with 32 groups needs a channel count divisible by 32, got {channels}")
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``x + conv2(drop(silu(norm2(conv1(silu(norm1(x)))))))``; a 1x1 ``nin_shortcut`` when channels change.

    SD's block also takes a timestep embedding; the autoencoder never uses one (``temb_channels=0``), so it
    is left out and the parameter set is the same as in an SD VAE.
    """

    def __init__(self, *, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual: ``x + proj_out(softmax(q k^T / sqrt(C)) v)``.

    q, k, v and proj_out are 1x1 convolutions (SD's parameter names and shapes ``[C, C, 1, 1]``).
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1, H*W, C]
            return t.reshape(b, 1, c, h * w).transpose(2, 3)

        q, k, v = tokens(self.q(hidden)), tokens(self.k(hidden)), tokens(self.v(hidden))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C), as in SD
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """SD's ``make_attn``: ``vanilla`` (and ``vanilla-xformers``, same weights) -> AttnBlock; ``none`` -> Identity."""
    if attn_type in ("vanilla", "vanilla-xformers"):
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type must be one of {_ATTN_TYPES}, got {attn_type!r} (linear attention is not supported)")


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2 after zero padding (0, 1, 0, 1) (SD), or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # torch convs pad symmetrically; SD pads right/bottom only, so pad by hand and convolve unpadded
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a 3x3 conv (when ``with_conv``)."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def _check_ddconfig(ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_type: str) -> None:
    if not ch_mult:
        raise ValueError("ch_mult must list at least one channel multiplier")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if attn_type not in _ATTN_TYPES:
        raise ValueError(f"attn_type must be one of {_ATTN_TYPES}, got {attn_type!r}")
    for mult in ch_mult:
        if (ch * mult) % 32 != 0:
            raise ValueError(f"ch * ch_mult entries must be multiples of 32 (GroupNorm), got ch={ch}, mult={mult}")


class Encoder(nn.Module):
    """Image -> latent moments ``[B, 2*z_channels (double_z) or z_channels, H/f, W/f]`` (see module docstring).

    Constructor arguments are SD's ``ddconfig``; ``out_ch`` and other decoder-only keys are accepted and ignored
    so one ``ddconfig`` builds both halves.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignore_kwargs,
    ):
        super().__init__()
        if use_linear_attn:
            raise ValueError("use_linear_attn=True (linear attention) is not supported")
        _check_ddconfig(ch, ch_mult, num_res_blocks, attn_type)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.double_z = double_z

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        self.norm_out = normalize(block_in)
        out_channels = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h*f, w*f]`` (see module docstring).

    ``give_pre_end`` returns the features before ``norm_out``; ``tanh_out`` squashes the output (both SD options,
    off by default). Encoder-only ddconfig keys (``double_z``, ``in_channels``) are accepted and ignored.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignore_kwargs,
    ):
        super().__init__()
        if use_linear_attn:
            raise ValueError("use_linear_attn=True (linear attention) is not supported")
        _check_ddconfig(ch, ch_mult, num_res_blocks, attn_type)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.z_channels = z_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            ups.insert(0, up)  # SD's index order: up[0] is the full-resolution level
        self.up = nn.ModuleList(ups)

        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
