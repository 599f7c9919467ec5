"""The simplified DDPM training objective with eps / x0 / v targets and optional min-SNR-gamma weighting.

DDPM Algorithm 1: ``t ~ Uniform{0..T-1}``, ``eps ~ N(0, I)``, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and
``L = w(t) * mean_dims ||target - model(x_t, t, c)||^2``, where the target is ``eps``, ``x0`` or
``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .gaussian import check_parameterization, q_sample, randn_like, training_target
from .noise_schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _check_gamma(gamma) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"min_snr_gamma must be a positive number, got {gamma!r}")


def min_snr_weight(snr: torch.Tensor, gamma: float, parameterization: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for a loss written in the given target space.

    All three weight the implied x0 error by ``min(SNR_t, gamma)``:
    eps: ``min(SNR, gamma) / SNR`` (= 1 where SNR = 0); x0: ``min(SNR, gamma)``; v: ``min(SNR, gamma) / (SNR + 1)``.
    snr: float tensor of any shape; returns the same shape and dtype.
    """
    check_parameterization(parameterization)
    _check_gamma(gamma)
    clipped = snr.clamp(max=gamma)
    if parameterization == "eps":
        # min(snr, gamma) / snr written as min(1, gamma / snr): finite (1) at snr = 0.
        return (gamma / snr).clamp(max=1.0)
    if parameterization == "x0":
        return clipped
    return clipped / (snr + 1.0)


def high_noise_timestep_density(num_timesteps: int, band_start: int, band_prob: float) -> torch.Tensor:
    """Training-time density over ``t in {0 .. T-1}`` that oversamples the high-noise band ``{band_start .. T-1}``:
    the mixture ``p(t) = (1 - q) / T + q * 1[t >= band_start] / (T - band_start)`` with ``q = band_prob``, so the
    band gets ``q + (1 - q) (T - band_start) / T`` of the draws. float64 ``[T]``, sums to 1; ``q = 0`` is uniform.

    Why: a model learns where the prompt puts objects only at steps where ``x_t`` no longer shows them: on the
    shapes latents under the cosine schedule, from ``t`` = 946-983 on (``scripts/layout_leak.py``), a few percent
    of uniform draws.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if isinstance(band_start, bool) or not isinstance(band_start, int) or not 0 <= band_start < num_timesteps:
        raise ValueError(f"band_start must be an int in [0, {num_timesteps - 1}], got {band_start!r}")
    if not 0.0 <= float(band_prob) <= 1.0:
        raise ValueError(f"band_prob must be in [0, 1], got {band_prob!r}")
    density = torch.full((num_timesteps,), (1.0 - band_prob) / num_timesteps, dtype=torch.float64)
    density[band_start:] += band_prob / (num_timesteps - band_start)
    return density


def sample_timesteps(
    batch_size: int,
    num_timesteps: int,
    device=None,
    generator: Optional[torch.Generator] = None,
    density: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``t ~ Uniform{0 .. T-1}``, or ``t ~ density`` (``[T]`` probabilities, e.g.
    :func:`high_noise_timestep_density`); int64 ``[B]``, drawn on the generator's device, moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    if density is None:
        t = torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=draw_device)
    else:
        if density.shape != (num_timesteps,):
            raise ValueError(f"density must have shape [{num_timesteps}], got {tuple(density.shape)}")
        t = torch.multinomial(density.to(draw_device), batch_size, replacement=True, generator=generator)
    return t.to(device)


def diffusion_loss(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    cond: Any = None,
    parameterization: str = "eps",
    min_snr_gamma: Optional[float] = None,
    noise: Optional[torch.Tensor] = None,
    t: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Simplified diffusion loss ``w(t) * mean_{dims} (target - model_fn(x_t, t, cond))^2``.

    Args:
        model_fn: ``model_fn(x_t [B, ...], t [B] int64, cond) -> output [B, ...]``.
        schedule: the forward process.
        x0: clean data ``[B, ...]``.
        parameterization: what the model predicts: ``eps``, ``x0`` or ``v``.
        min_snr_gamma: when set, weight each sample by :func:`min_snr_weight`.
        noise, t: fixed noise ``[B, ...]`` / timesteps ``[B]`` (drawn from ``generator`` when None).
        reduction: ``mean`` -> scalar (mean over the batch); ``none`` -> per-sample losses ``[B]``.

    The squared error is computed in at least float32 (x0 of float64 stays float64).
    """
    check_parameterization(parameterization)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if min_snr_gamma is not None:
        _check_gamma(min_snr_gamma)
    if x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a non-empty batch [B, ...], got shape {tuple(x0.shape)}")
    batch = x0.shape[0]
    if t is None:
        t = sample_timesteps(batch, schedule.num_timesteps, x0.device, generator)
    else:
        t = schedule.check_timesteps(t, x0).to(x0.device)
        if t.ndim == 0 or t.shape[0] == 1:
            t = t.reshape(1).expand(batch)
    if noise is None:
        noise = randn_like(x0, generator)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")

    alpha_cumprod = schedule.gather("alphas_cumprod", t, x0)  # validates t once
    x_t = q_sample(x0, noise, alpha_cumprod)
    target = training_target(x0, noise, alpha_cumprod, parameterization)
    output = model_fn(x_t, t, cond)
    if output.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} != x0 shape {tuple(x0.shape)}")

    dtype = torch.promote_types(output.dtype, torch.float32)
    error = (output.to(dtype) - target.to(dtype)) ** 2
    per_sample = error.reshape(batch, -1).mean(dim=1)
    if min_snr_gamma is not None:
        weight = min_snr_weight(alpha_cumprod / (1 - alpha_cumprod), min_snr_gamma, parameterization)
        per_sample = per_sample * weight.to(device=per_sample.device, dtype=dtype)
    return per_sample.mean() if reduction == "mean" else per_sample
