"""The denoising UNet of latent diffusion, with Stable Diffusion's constructor and state-dict layout.

``UNetModel`` takes the ``unet_config.params`` of SD's ``v1-inference.yaml`` / ``v2-inference.yaml`` as they are,
and ``model.diffusion_model.*`` from a real v1 or v2 checkpoint loads into it unchanged:

* ``time_embed.0`` / ``time_embed.2``: MLP on the sinusoidal timestep embedding.
* ``input_blocks.N.M``: ``TimestepEmbedSequential`` of ``ResBlock`` / ``SpatialTransformer`` (or ``AttentionBlock``)
  / ``Downsample`` (``op``); ``input_blocks.0.0`` is the input convolution.
* ``middle_block``: ResBlock, attention, ResBlock.
* ``output_blocks.N.M``: ResBlock on the concatenated skip, attention, ``Upsample`` (``conv``).
* ``out.0`` / ``out.2``: GroupNorm, SiLU, zero-initialised convolution (the model outputs exactly 0 at init).

ResBlock keys: ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``, ``skip_connection``.

Precision: ``use_fp16`` / ``use_bf16`` are accepted for config compatibility and recorded in ``self.dtype``, but
the model never casts itself: precision is chosen outside, by ``torch.autocast`` or by converting the module
(``model.half()``). On the CPU nothing ever runs in fp16 unless the caller asks for it. The body runs in the dtype
of its parameters (an fp32 input to a half model is cast in, the output is cast back to the input's dtype).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer, scaled_dot_product_attention
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes the timestep embedding as second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to ``x`` given timestep embeddings ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """``nn.Sequential`` that hands ``emb`` to timestep blocks and ``context`` to spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (inner two dims for 3-D signals), then a 3x3 conv if ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the number of channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv (``op``) if ``use_conv``, else average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without a convolution cannot change the number of channels")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    ``h = conv(SiLU(GN(x)))``; ``h = h + W emb`` (or ``GN(h) * (1 + scale) + shift`` with
    ``use_scale_shift_norm``); ``h = conv0(dropout(SiLU(GN(h))))`` with a zero-initialised ``conv0``;
    returns ``skip(x) + h``. ``up``/``down`` resample inside the block (``resblock_updown``).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout) if dropout > 0 else nn.Identity(),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: [B, C, ...], emb: [B, emb_channels] -> [B, out_channels, ...]."""
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = self.h_upd(in_rest(x))
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.view(*emb_out.shape, *([1] * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(torch.addcmul(shift, out_norm(h), 1 + scale))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the positions of a feature map (the UNet's attention without a transformer).

    Keys ``norm``, ``qkv`` (1x1 conv1d to 3C), ``proj_out`` (zero-initialised). ``use_new_attention_order``
    splits q/k/v before heads (``QKVAttention``), otherwise heads before q/k/v (``QKVAttentionLegacy``).
    ``backend`` overrides the global attention backend for this layer.
    """

    uses_attention_backend = True

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.channels = channels
        self.backend = backend
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(f"channels {channels} cannot be split into {self.num_heads} heads")
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, enabled=self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # [B, 3C, T]
        length, heads, ch = qkv.shape[-1], self.num_heads, c // self.num_heads
        if self.use_new_attention_order:
            q, k, v = (t.reshape(b, heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b, heads, 3 * ch, length).split(ch, dim=2)
        # [B, H, ch, T] -> [B, H, T, ch] views for the attention kernel.
        h = scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), backend=self.backend
        )
        h = h.transpose(-1, -2).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


def _as_list(value) -> Optional[list]:
    """OmegaConf ListConfig / tuples to plain lists (``None`` unchanged)."""
    if value is None or isinstance(value, (int, str)):
        return value
    return list(value)


class UNetModel(nn.Module):
    """The diffusion UNet with attention and timestep embedding (Stable Diffusion's ``openaimodel.UNetModel``).

    Args:
        image_size: unused (kept for config compatibility).
        in_channels, out_channels: channels of the input / output tensor.
        model_channels: base channel count; level ``i`` has ``channel_mult[i] * model_channels``.
        num_res_blocks: ResBlocks per level (an int or one per level).
        attention_resolutions: downsampling rates (1, 2, 4, ...) at which attention layers are added.
        dropout: dropout in the ResBlocks.
        channel_mult: channel multiplier per level.
        conv_resample: learned convolutions for up/downsampling.
        dims: 1, 2 or 3-D signals.
        num_classes: int (class-conditional), ``"continuous"`` or ``"sequential"`` (``adm_in_channels`` vector).
        use_checkpoint: gradient checkpointing (only in training mode with grad enabled).
        use_fp16, use_bf16: accepted for compatibility; see the module docstring (no casting happens here).
        num_heads / num_head_channels: attention heads, or a fixed width per head (one of them must be set).
        num_heads_upsample: heads in the decoder's ``AttentionBlock`` (defaults to ``num_heads``).
        use_scale_shift_norm: FiLM-like timestep conditioning in the ResBlocks.
        resblock_updown: ResBlocks for up/downsampling instead of ``Upsample``/``Downsample``.
        use_new_attention_order: q/k/v split order in ``AttentionBlock``.
        use_spatial_transformer: ``SpatialTransformer`` (cross-attention to ``context``) instead of ``AttentionBlock``.
        transformer_depth: blocks per ``SpatialTransformer``.
        context_dim: feature size of the context (text embeddings).
        n_embed: predict codebook ids (``id_predictor``) instead of the output.
        legacy: SD's legacy head-width rule.
        disable_self_attentions: per level, make attn1 attend to the context too.
        num_attention_blocks: per level, how many of the ResBlocks get an attention layer.
        disable_middle_self_attn: same for the middle block.
        use_linear_in_transformer: linear proj_in/out in the transformers (SD 2).
        adm_in_channels: width of ``y`` for ``num_classes="sequential"``.
    """

    def __init__(
        self,
        image_size,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Union[None, int, str] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: Union[None, int, Sequence[int]] = None,
        n_embed: Optional[int] = None,
        legacy: bool = True,
        disable_self_attentions: Optional[Sequence[bool]] = None,
        num_attention_blocks: Optional[Sequence[int]] = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: Optional[int] = None,
    ):
        super().__init__()
        channel_mult = tuple(_as_list(channel_mult))
        attention_resolutions = tuple(_as_list(attention_resolutions))
        context_dim = _as_list(context_dim)
        disable_self_attentions = _as_list(disable_self_attentions)
        num_attention_blocks = _as_list(num_attention_blocks)

        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the width of the conditioning)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is set but use_spatial_transformer=False: cross-attention needs it")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        else:
            num_res_blocks = list(num_res_blocks)
            if len(num_res_blocks) != len(channel_mult):
                raise ValueError(
                    "num_res_blocks must be an int or a list with one entry per level of channel_mult "
                    f"({len(channel_mult)}), got {num_res_blocks}"
                )
        if disable_self_attentions is not None and len(disable_self_attentions) != len(channel_mult):
            raise ValueError("disable_self_attentions needs one entry per level of channel_mult")
        if num_attention_blocks is not None:
            if len(num_attention_blocks) != len(num_res_blocks) or any(
                a > r for a, r in zip(num_attention_blocks, num_res_blocks)
            ):
                raise ValueError(
                    f"num_attention_blocks {num_attention_blocks} needs one entry per level, each <= num_res_blocks"
                )
        if num_classes is not None and not isinstance(num_classes, int) and num_classes not in ("continuous", "sequential"):
            raise ValueError(f"num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")
        if num_classes == "sequential" and adm_in_channels is None:
            raise ValueError("num_classes='sequential' needs adm_in_channels")

        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.bfloat16 if use_bf16 else (torch.float16 if use_fp16 else torch.float32)
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.use_spatial_transformer = use_spatial_transformer
        self.context_dim = context_dim
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb = nn.Embedding(num_classes, time_embed_dim)
            elif num_classes == "continuous":
                self.label_emb = nn.Linear(1, time_embed_dim)
            else:
                self.label_emb = nn.Sequential(
                    nn.Sequential(
                        linear(adm_in_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
                    )
                )

        def heads_for(ch: int) -> tuple[int, int]:
            """(heads, head width) of an attention layer on ``ch`` channels, as SD computes them."""
            if num_head_channels == -1:
                if ch % num_heads:
                    raise ValueError(f"{ch} channels cannot be split into num_heads={num_heads} heads")
                heads, dim_head = num_heads, ch // num_heads
            else:
                if ch % num_head_channels:
                    raise ValueError(f"{ch} channels cannot be split into heads of num_head_channels={num_head_channels}")
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            return heads, dim_head

        def attention_layer(ch: int, disabled_sa: bool, upsample_heads: bool) -> nn.Module:
            heads, dim_head = heads_for(ch)
            if use_spatial_transformer:
                return SpatialTransformer(
                    ch,
                    heads,
                    dim_head,
                    depth=transformer_depth,
                    context_dim=context_dim,
                    disable_self_attn=disabled_sa,
                    use_linear=use_linear_in_transformer,
                    use_checkpoint=use_checkpoint,
                )
            return AttentionBlock(
                ch,
                use_checkpoint=use_checkpoint,
                num_heads=num_heads_upsample if upsample_heads else heads,
                num_head_channels=dim_head,
                use_new_attention_order=use_new_attention_order,
            )

        def res_block(ch: int, out_ch: int, **kwargs) -> ResBlock:
            return ResBlock(
                ch,
                time_embed_dim,
                dropout,
                out_channels=out_ch,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kwargs,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for nr in range(num_res_blocks[level]):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions and (num_attention_blocks is None or nr < num_attention_blocks[level]):
                    disabled_sa = bool(disable_self_attentions[level]) if disable_self_attentions is not None else False
                    layers.append(attention_layer(ch, disabled_sa, upsample_heads=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        res_block(ch, ch, down=True)
                        if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                )
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attention_layer(ch, disable_middle_self_attn, upsample_heads=False),
            res_block(ch, ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and (num_attention_blocks is None or i < num_attention_blocks[level]):
                    disabled_sa = bool(disable_self_attentions[level]) if disable_self_attentions is not None else False
                    layers.append(attention_layer(ch, disabled_sa, upsample_heads=True))
                if level and i == num_res_blocks[level]:
                    layers.append(
                        res_block(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))

    # ------------------------------------------------------------------ checks
    def _expected_context_dim(self) -> Optional[int]:
        dims = self.context_dim if isinstance(self.context_dim, list) else [self.context_dim]
        return dims[0] if len(set(dims)) == 1 else None

    def _check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, context, y) -> torch.Tensor:
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNetModel: x must be [B, {self.in_channels}, *spatial] with {self.dims} spatial dims, "
                f"got shape {tuple(x.shape)}"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        spatial = x.shape[2:] if self.dims != 3 else x.shape[3:]
        if any(s % factor for s in spatial):
            raise ValueError(
                f"UNetModel: spatial size {tuple(x.shape[2:])} must be divisible by {factor} "
                f"(2 ** (len(channel_mult) - 1) for channel_mult {list(self.channel_mult)})"
            )
        batch = x.shape[0]
        if timesteps is None:
            raise ValueError("UNetModel: timesteps are required")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(f"UNetModel: timesteps must be a scalar or [B={batch}], got shape {tuple(timesteps.shape)}")
        if self.use_spatial_transformer:
            if context is None:
                raise ValueError("UNetModel: this model cross-attends to a context; pass context [B, L, context_dim]")
            for c in context if isinstance(context, (list, tuple)) else [context]:
                if c.ndim != 3 or c.shape[0] != batch:
                    raise ValueError(f"UNetModel: context must be [B={batch}, L, D], got shape {tuple(c.shape)}")
                expected = self._expected_context_dim()
                if expected is not None and c.shape[-1] != expected:
                    raise ValueError(
                        f"UNetModel: context has {c.shape[-1]} features in its last dim, "
                        f"the model was built with context_dim={expected}"
                    )
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("UNetModel: pass y (class labels / adm vector) if and only if the model is class-conditional")
        if y is not None and y.shape[0] != batch:
            raise ValueError(f"UNetModel: y has batch {y.shape[0]}, x has {batch}")
        return timesteps

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        timesteps: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: [B, in_channels, H, W], timesteps: [B] (or a scalar), context: [B, L, context_dim],
        y: [B] labels (class-conditional models) -> [B, out_channels, H, W] in x's dtype."""
        timesteps = self._check_inputs(x, timesteps, context, y)
        body_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(body_dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        # Autocast picks the compute dtype itself; otherwise run in the parameters' dtype.
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(body_dtype)
        if context is not None and not isinstance(context, (list, tuple)) and not torch.is_autocast_enabled(x.device.type):
            context = context.to(body_dtype)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        out = self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
        return out.to(x.dtype)
