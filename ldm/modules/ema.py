"""Exponential moving average of a model's weights (Stable Diffusion's ``LitEma``).

After the n-th update (n = 1, 2, ...)::

    d_n = min(decay, (1 + n) / (10 + n))        (with use_num_updates; else d_n = decay)
    shadow <- d_n * shadow + (1 - d_n) * param

The warm-up keeps early averages from being dominated by the random initialisation.

The shadow weights are buffers named like the parameters with the dots removed (``input_blocks.0.0.weight``
-> ``input_blocks00weight``) next to ``decay`` and ``num_updates``: SD's ``model_ema.*`` checkpoint layout, and
Lightning saves them with the module. A checkpoint thus holds the raw weights (the model) and the EMA weights
(this module) once each; ``store``'s temporary copy is never saved.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


def ema_decay(decay: float, num_updates: int) -> float:
    """The decay of update number ``num_updates`` (1-based): ``min(decay, (1 + n) / (10 + n))``; ``decay`` if n < 0."""
    if num_updates < 0:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA(nn.Module):
    """EMA of the trainable parameters of ``model``.

    Args:
        model: the module whose parameters (those with ``requires_grad``) are averaged.
        decay: the asymptotic decay (0.9999 in SD).
        use_num_updates: warm the decay up as ``(1 + n) / (10 + n)`` (SD's default).

    Use ``update(model)`` after each optimizer step (``ema(model)`` does the same), ``copy_to(model)`` to
    install the averages, or ``with ema.average_parameters(model): ...`` to run with them and get the raw
    weights back afterwards (``store``/``restore`` do the two halves).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        self.m_name2s_name: dict[str, str] = {}
        taken = set(dir(self))
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            s_name = name.replace(".", "")
            if s_name in taken:
                raise ValueError(f"EMA: parameter {name!r} maps to buffer name {s_name!r}, which is already used")
            taken.add(s_name)
            self.m_name2s_name[name] = s_name
            self.register_buffer(s_name, param.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @property
    def current_decay(self) -> float:
        """The decay the last update used (``decay`` before any update when warm-up is off)."""
        return ema_decay(float(self.decay), int(self.num_updates))

    def reset_num_updates(self) -> None:
        """Restart the warm-up (e.g. when fine-tuning from a checkpoint)."""
        self.num_updates.fill_(0)

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        missing = [name for name in self.m_name2s_name if name not in params]
        untracked = [name for name, p in params.items() if p.requires_grad and name not in self.m_name2s_name]
        if missing or untracked:
            raise ValueError(
                f"EMA does not match the model: missing parameters {missing[:5]}, untracked trainable {untracked[:5]}"
            )
        return [(self._buffers[s_name], params[name]) for name, s_name in self.m_name2s_name.items()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current parameters."""
        decay = float(self.decay)
        if int(self.num_updates) >= 0:
            self.num_updates += 1
            decay = ema_decay(decay, int(self.num_updates))
        weight = 1.0 - decay
        grouped: dict[tuple, tuple[list, list]] = {}
        for shadow, param in self._pairs(model):
            if param.dtype != shadow.dtype or param.device != shadow.device:
                param = param.to(device=shadow.device, dtype=shadow.dtype)
            shadows, params = grouped.setdefault((shadow.device, shadow.dtype), ([], []))
            shadows.append(shadow)
            params.append(param)
        # shadow += (1 - d) * (param - shadow), one fused kernel per device/dtype group
        for shadows, params in grouped.values():
            torch._foreach_lerp_(shadows, params, weight)

    def forward(self, model: nn.Module) -> None:
        """Same as :meth:`update` (SD's ``self.model_ema(self.model)``)."""
        self.update(model)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s tracked parameters with the averages."""
        for shadow, param in self._pairs(model):
            param.copy_(shadow)

    @torch.no_grad()
    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of ``parameters`` (to :meth:`restore` after evaluating with the averages)."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the parameters saved by :meth:`store` (same order)."""
        parameters = list(parameters)
        if len(parameters) != len(self.collected_params):
            raise ValueError(
                f"EMA.restore: {len(parameters)} parameters given, {len(self.collected_params)} stored "
                "(call store() with the same parameters first)"
            )
        for saved, param in zip(self.collected_params, parameters):
            param.copy_(saved)
        self.collected_params = []

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context manager: ``model`` holds the EMA weights inside, its own weights again after (even on error)."""
        params = list(model.parameters())
        self.store(params)
        try:
            self.copy_to(model)
            yield model
        finally:
            self.restore(params)
