"""The latent scale factor: ``1 / std`` of the encoder's latents, so the diffusion model sees unit-variance inputs.

As CompVis' ``scale_by_std``: latents are posterior *samples* ``z ~ q(z|x)`` (not the means), and the factor is
``1 / std(z)`` over every element of every latent of the batches seen (Stable Diffusion's VAE gives 0.18215).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class LatentStatistics:
    mean: float
    std: float
    count: int  # number of latent elements

    @property
    def scale_factor(self) -> float:
        return scale_factor_from_std(self.std)


def scale_factor_from_std(std: float) -> float:
    """``1 / std``; ``ValueError`` for a zero/non-finite std (a collapsed or broken encoder)."""
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent std must be positive and finite to define a scale factor, got {std}")
    return 1.0 / std


class _Moments:
    """Running count, sum and sum of squares in float64 -> mean and unbiased std."""

    def __init__(self):
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().to(torch.float64).flatten()
        self.count += values.numel()
        self.total += float(values.sum())
        self.total_sq += float((values * values).sum())

    def result(self) -> tuple[float, float]:
        if self.count < 2:
            raise ValueError("need at least two latent values to estimate a standard deviation")
        mean = self.total / self.count
        var = max(self.total_sq - self.count * mean * mean, 0.0) / (self.count - 1)
        return mean, math.sqrt(var)


@torch.no_grad()
def latent_statistics(
    model,
    batches: Iterable,
    num_batches: int | None = None,
    sample_posterior: bool = True,
    image_key: str = "image",
    generator: torch.Generator | None = None,
) -> LatentStatistics:
    """Mean and std of the latents of ``model.encode(x)`` over (at most ``num_batches`` of) ``batches``.

    ``batches`` yields image tensors ``[B, C, H, W]`` or dicts with ``image_key``. The model's device is used.
    """
    device = next(model.parameters()).device
    moments = _Moments()
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            x = batch[image_key] if isinstance(batch, dict) else batch
            posterior = model.encode(x.to(device))
            z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
            moments.update(z)
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no batches to compute latent statistics from")
    mean, std = moments.result()
    return LatentStatistics(mean=mean, std=std, count=moments.count)
