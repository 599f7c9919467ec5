"""Attention for the diffusion UNet: cross-attention, the transformer block, and the spatial transformer.

Key names follow Stable Diffusion's ``ldm/modules/attention.py`` (``to_q``/``to_k``/``to_v``/``to_out.0``,
``ff.net.0.proj``/``ff.net.2``, ``norm1..3``, ``proj_in``/``proj_out``) so SD v1/v2 checkpoints load unchanged.

The softmax(QK^T/sqrt(d))V product itself is :func:`scaled_dot_product_attention`, with three backends that
compute the same function:

* ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels).
* ``"xformers"``: ``xformers.ops.memory_efficient_attention``; only when xformers is installed and the tensors
  are on CUDA, otherwise it falls back to ``"sdpa"`` with a one-time log message.
* ``"math"``: plain einsum, with the logits and softmax in float32 under half/bfloat16 (SD 2's
  ``_ATTN_PRECISION = "fp32"``: in fp16 the logits of the 768-v model overflow).

One setting picks the backend: :func:`set_attention_backend` (or env var ``LDM_ATTENTION_BACKEND`` read at
import); ``set_attention_backend(name, module)`` or ``CrossAttention(backend=...)`` overrides it per module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "xformers", "math")
ENV_VAR = "LDM_ATTENTION_BACKEND"


def _check_backend(name: str, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{where}: unknown attention backend {name!r}; choose one of {list(BACKENDS)}")
    return name.lower()


_default_backend = _check_backend(os.environ.get(ENV_VAR, "sdpa") or "sdpa", f"environment variable {ENV_VAR}")
_logged: set[str] = set()
_xformers_ops = None
_xformers_checked = False


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def _xformers():
    """``xformers.ops`` or ``None``; imported lazily and only once (importing it costs seconds)."""
    global _xformers_ops, _xformers_checked
    if not _xformers_checked:
        _xformers_checked = True
        if importlib.util.find_spec("xformers") is not None:
            try:
                import xformers.ops as ops

                _xformers_ops = ops
            except Exception as error:  # a broken install (e.g. built for another torch): degrade, say why
                _log_once(f"xformers is installed but failed to import ({error}); using sdpa attention")
    return _xformers_ops


def get_attention_backend() -> str:
    """The global backend name (what modules without their own override use)."""
    return _default_backend


def set_attention_backend(name: str, module: Optional[nn.Module] = None) -> None:
    """Choose the attention backend: globally, or (``module`` given) for every attention layer inside ``module``.

    ``name`` is one of ``"sdpa"``, ``"xformers"``, ``"math"``; for a module, ``None`` removes the override.
    """
    global _default_backend
    if module is None:
        _default_backend = _check_backend(name, "set_attention_backend")
        return
    name = None if name is None else _check_backend(name, "set_attention_backend")
    for sub in module.modules():
        if getattr(sub, "uses_attention_backend", False):
            sub.backend = name


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Context manager: the global backend is ``name`` inside, the previous one after."""
    previous = _default_backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def resolve_backend(name: Optional[str], tensor: torch.Tensor, masked: bool = False) -> str:
    """The backend that will actually run: ``name`` (or the global one), xformers only if usable here."""
    name = _default_backend if name is None else _check_backend(name, "attention backend")
    if name == "xformers":
        if not tensor.is_cuda:
            _log_once("xformers attention needs CUDA tensors; falling back to sdpa attention")
            return "sdpa"
        if _xformers() is None:
            _log_once("xformers attention requested but xformers is not installed; falling back to sdpa attention")
            return "sdpa"
        if masked:
            _log_once("xformers attention with a key mask is not wired up; using sdpa attention for masked calls")
            return "sdpa"
    return name


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    low_precision = q.dtype in (torch.float16, torch.bfloat16)
    # Logits and softmax in float32 under half precision, outside autocast so it cannot cast them back down.
    with torch.autocast(device_type=q.device.type, enabled=False):
        if low_precision:
            q, k = q.float(), k.float()
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
        if mask is not None:
            sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
        probs = sim.softmax(dim=-1).to(v.dtype)
        return torch.einsum("bhij,bhjd->bhid", probs, v)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, per batch element and head.

    Args:
        q: [B, H, Nq, D]; k, v: [B, H, Nk, D] (any strides with a contiguous last dim: views are fine).
        mask: optional boolean [B, Nk] (or broadcastable to [B, H, Nq, Nk]); ``True`` = attend to that key.
        backend: ``"sdpa"``, ``"xformers"``, ``"math"`` or ``None`` for the global setting.
    Returns:
        [B, H, Nq, D]
    """
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
        if mask.ndim == 2:
            mask = mask[:, None, None, :]
    name = resolve_backend(backend, q, masked=mask is not None)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if name == "math":
        return _math_attention(q, k, v, mask)
    # xformers wants [B, N, H, D]: the transposes are views, no copies.
    out = _xformers().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def checkpoint(function, *args, enabled: bool = True):
    """``function(*args)``, recomputed in backward (non-reentrant) when ``enabled`` and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(function, *args, use_reentrant=False)
    return function(*args)


class CrossAttention(nn.Module):
    """Multi-head attention with queries from ``x`` and keys/values from ``context`` (``x`` itself if ``None``).

    Args:
        query_dim: feature size of ``x``.
        context_dim: feature size of ``context`` (default ``query_dim``: self-attention).
        heads, dim_head: number of heads and their width (inner width ``heads * dim_head``).
        dropout: dropout after the output projection (SD's ``to_out.1``).
        backend: per-module override of the global attention backend (``None``: follow the global one).
    """

    uses_attention_backend = True  # set_attention_backend(name, module) reaches this layer

    def __init__(
        self,
        query_dim: int,
        context_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.query_dim = query_dim
        self.context_dim = context_dim
        self.backend = None if backend is None else _check_backend(backend, "CrossAttention(backend=...)")
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x: [B, N, query_dim], context: [B, M, context_dim] or None, mask: bool [B, M] -> [B, N, query_dim]."""
        context = x if context is None else context
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"CrossAttention: context has {context.shape[-1]} features, this layer expects {self.context_dim}"
            )
        b, n, _ = x.shape
        m = context.shape[1]
        h, d = self.heads, self.dim_head
        # [B, N, H*D] -> [B, H, N, D] as views; the kernels take these strides without copying.
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)
        k = self.to_k(context).view(b, m, h, d).transpose(1, 2)
        v = self.to_v(context).view(b, m, h, d).transpose(1, 2)
        out = scaled_dot_product_attention(q, k, v, mask=mask, backend=self.backend)
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit: ``a * gelu(g)`` with ``[a, g] = proj(x)`` (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise MLP ``dim -> mult*dim -> dim_out`` (GEGLU when ``glu``); keys ``net.0``, ``net.2``."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GEGLU feed-forward.

    ``x = x + attn1(norm1(x)); x = x + attn2(norm2(x), context); x = x + ff(norm3(x))``.
    With ``disable_self_attn`` attn1 also attends to the context. ``checkpoint`` recomputes the block in
    backward (training mode only).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, N, dim], context: [B, M, context_dim] -> [B, N, dim]."""
        return checkpoint(self._forward, x, context, enabled=self.checkpoint and self.training)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (residual branches start as the identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a context, added back as a residual.

    ``x [B, C, H, W] -> GroupNorm -> proj_in -> tokens [B, H*W, inner] -> depth x BasicTransformerBlock
    -> proj_out (zero-initialised) -> + x``, ``inner = n_heads * d_head``. ``use_linear`` makes proj_in/out
    ``nn.Linear`` on tokens (SD 2) instead of 1x1 convolutions (SD 1).

    ``context_dim`` may be a list with one entry per block; ``forward``'s ``context`` likewise.
    A channels_last input stays channels_last (the token view of it needs no copy).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Union[None, int, Sequence[int]] = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
    ):
        super().__init__()
        context_dims = self._per_block(context_dim, depth, "context_dim")
        self.in_channels = in_channels
        self.depth = depth
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.use_linear = use_linear
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim,
                    n_heads,
                    d_head,
                    dropout=dropout,
                    context_dim=context_dims[i],
                    disable_self_attn=disable_self_attn,
                    checkpoint=use_checkpoint,
                )
                for i in range(depth)
            ]
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    @staticmethod
    def _per_block(value, depth: int, name: str) -> list:
        if value is None or isinstance(value, (int, torch.Tensor)):
            return [value] * depth
        value = list(value)
        if len(value) == 1:
            return value * depth
        if len(value) != depth:
            raise ValueError(f"SpatialTransformer: {name} has {len(value)} entries for depth {depth}")
        return value

    def forward(
        self, x: torch.Tensor, context: Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]] = None
    ) -> torch.Tensor:
        """x: [B, C, H, W], context: [B, M, context_dim] (or a list, one per block) -> [B, C, H, W]."""
        contexts = self._per_block(context, self.depth, "context")
        b, c, height, width = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        inner = x.shape[1]
        # [B, C, H, W] -> [B, HW, C]: a free view when x is channels_last, one copy otherwise.
        x = x.permute(0, 2, 3, 1).reshape(b, height * width, inner)
        if self.use_linear:
            x = self.proj_in(x)
        for block, ctx in zip(self.transformer_blocks, contexts):
            x = block(x, context=ctx)
        if self.use_linear:
            x = self.proj_out(x)
        # Back to [B, C, H, W] in the input's memory format: left as a channels_last view of a contiguous input, the
        # 1x1 conv and the residual sum below mixed layouts, which made the bf16-autocast SD-v1 training step 13%
        # slower (its convolutions and copies; equal in fp32). A channels_last input keeps the free view.
        channels_last = x_in.is_contiguous(memory_format=torch.channels_last) and not x_in.is_contiguous()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = x.reshape(b, height, width, x.shape[-1]).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
        if not self.use_linear:
            x = self.proj_out(x)
        # x_in first: the sum takes the input's memory format.
        return x_in + x
