"""Gaussian diffusion math as pure functions over explicit coefficients (k-diffusion style).

Notation (0-based timesteps as in the DDPM / Stable Diffusion code): ``abar = alpha_cumprod`` is the signal level
of ``x_t``, ``q(x_t | x_0) = N(sqrt(abar) x_0, (1 - abar) I)``; ``abar_prev`` is that of the previous (less noisy)
state (1 before the first step).

Shapes: ``x``-like tensors are ``[B, ...]``; a coefficient (``alpha_cumprod`` etc.) is a Python number, a 0-d
tensor or a 1-D tensor ``[B]`` (or ``[1]``) and is broadcast over the trailing dims of ``x``. Coefficients are
formed in float64 (sqrt, ratios) and only then cast to the dtype of ``x``, so low-precision tensors are computed
with correctly rounded coefficients. Results have the dtype of ``x``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

Coefficient = Union[float, torch.Tensor]

PARAMETERIZATIONS = ("eps", "x0", "v")


def check_parameterization(parameterization: str) -> str:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}"
        )
    return parameterization


def _check_broadcast(*tensors: torch.Tensor) -> None:
    try:
        torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError as error:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise ValueError(f"tensor shapes do not broadcast: {shapes}") from error


def as_coefficient(value: Coefficient, like: torch.Tensor, name: str = "coefficient") -> torch.Tensor:
    """``value`` as a float64 tensor shaped to broadcast over ``like`` ``[B, ...]``: ``[]`` or ``[B, 1, ..., 1]``.

    Stays on its own device (float64 is not available everywhere); :func:`cast_like` moves it.
    """
    c = torch.as_tensor(value, dtype=torch.float64)
    if c.ndim == 0:
        return c
    if c.ndim != 1:
        raise ValueError(f"{name} must be a number or a 1-D tensor [B], got shape {tuple(c.shape)}")
    if like.ndim == 0 or c.shape[0] not in (1, like.shape[0]):
        raise ValueError(
            f"{name} of shape {tuple(c.shape)} does not broadcast over a batch of shape {tuple(like.shape)}"
        )
    return c.reshape(c.shape[0], *([1] * (like.ndim - 1)))


def cast_like(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Float64 coefficient -> dtype and device of ``like`` (rounded once, at the end)."""
    return c.to(device=like.device, dtype=like.dtype)


def randn(
    shape: Sequence[int],
    generator: Optional[torch.Generator | Sequence[torch.Generator]] = None,
    device: torch.device | str | None = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Standard normal noise ``[*shape]`` on ``device``; drawn on the generator's device (so a CPU generator gives
    the same numbers for CPU and GPU runs), then moved.

    ``generator`` may be a sequence of one generator per row (``len == shape[0]``): row ``k`` is drawn from generator
    ``k`` alone, so an image's noise does not depend on which other images share its batch.
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per row")
        return torch.stack([randn(shape[1:], g, device, dtype) for g in generator])
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return noise if device is None else noise.to(device)


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator | Sequence[torch.Generator]] = None) -> torch.Tensor:
    """:func:`randn` shaped like ``x``, on its device and in its dtype (one generator, or one per row)."""
    return randn(x.shape, generator, x.device, x.dtype)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: Coefficient) -> torch.Tensor:
    """Sample of ``q(x_t | x_0)``: ``x_t = sqrt(abar) x0 + sqrt(1 - abar) noise``.

    x0, noise: ``[B, ...]``; alpha_cumprod: number or ``[B]``. Returns ``[B, ...]``.
    """
    _check_broadcast(x0, noise)
    a = as_coefficient(alpha_cumprod, x0, "alpha_cumprod")
    return cast_like(a.sqrt(), x0) * x0 + cast_like((1 - a).sqrt(), x0) * noise


def q_posterior_mean_variance(
    x0: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: Coefficient, alpha_cumprod_prev: Coefficient
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q(x_prev | x_t, x0) = N(c1 x0 + c2 x_t, beta~)`` for a step from ``abar`` to ``abar_prev`` (DDPM eq. 6-7).

    With ``alpha = abar / abar_prev`` and ``beta = 1 - alpha``:
    ``c1 = sqrt(abar_prev) beta / (1 - abar)``, ``c2 = sqrt(alpha) (1 - abar_prev) / (1 - abar)``,
    ``beta~ = beta (1 - abar_prev) / (1 - abar)``.
    Returns ``(mean [B, ...], variance, log_variance)``; variance and log-variance are ``[]`` or ``[B, 1, ..., 1]``.
    ``log_variance`` is ``-inf`` where ``beta~ = 0`` (the first step, ``abar_prev = 1``).
    """
    _check_broadcast(x0, x_t)
    a = as_coefficient(alpha_cumprod, x_t, "alpha_cumprod")
    a_prev = as_coefficient(alpha_cumprod_prev, x_t, "alpha_cumprod_prev")
    c1, c2, var = posterior_coefficients(a, a_prev)
    mean = cast_like(c1, x_t) * x0 + cast_like(c2, x_t) * x_t
    return mean, cast_like(var, x_t), cast_like(var.log(), x_t)


def posterior_coefficients(
    alpha_cumprod: torch.Tensor, alpha_cumprod_prev: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 ``(c1, c2, beta~)`` of :func:`q_posterior_mean_variance` (any broadcastable shapes)."""
    a = torch.as_tensor(alpha_cumprod, dtype=torch.float64)
    a_prev = torch.as_tensor(alpha_cumprod_prev, dtype=torch.float64)
    alpha = a / a_prev
    beta = 1 - alpha
    c1 = a_prev.sqrt() * beta / (1 - a)
    c2 = alpha.sqrt() * (1 - a_prev) / (1 - a)
    var = beta * (1 - a_prev) / (1 - a)
    return c1, c2, var


def predict_x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_cumprod: Coefficient) -> torch.Tensor:
    """``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``. Ill-conditioned as ``abar -> 0`` (zero terminal SNR)."""
    _check_broadcast(x_t, eps)
    a = as_coefficient(alpha_cumprod, x_t, "alpha_cumprod")
    return cast_like(a.rsqrt(), x_t) * x_t - cast_like(((1 - a) / a).sqrt(), x_t) * eps


def predict_eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_cumprod: Coefficient) -> torch.Tensor:
    """``eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)``. Ill-conditioned as ``abar -> 1``."""
    _check_broadcast(x_t, x0)
    a = as_coefficient(alpha_cumprod, x_t, "alpha_cumprod")
    return cast_like((1 - a).rsqrt(), x_t) * x_t - cast_like((a / (1 - a)).sqrt(), x_t) * x0


def get_v(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: Coefficient) -> torch.Tensor:
    """Velocity target (Salimans & Ho 2022): ``v = sqrt(abar) eps - sqrt(1 - abar) x0``."""
    _check_broadcast(x0, noise)
    a = as_coefficient(alpha_cumprod, x0, "alpha_cumprod")
    return cast_like(a.sqrt(), x0) * noise - cast_like((1 - a).sqrt(), x0) * x0


def predict_x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_cumprod: Coefficient) -> torch.Tensor:
    """``x0 = sqrt(abar) x_t - sqrt(1 - abar) v`` (well conditioned for every ``abar`` in [0, 1])."""
    _check_broadcast(x_t, v)
    a = as_coefficient(alpha_cumprod, x_t, "alpha_cumprod")
    return cast_like(a.sqrt(), x_t) * x_t - cast_like((1 - a).sqrt(), x_t) * v


def predict_eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_cumprod: Coefficient) -> torch.Tensor:
    """``eps = sqrt(1 - abar) x_t + sqrt(abar) v``."""
    _check_broadcast(x_t, v)
    a = as_coefficient(alpha_cumprod, x_t, "alpha_cumprod")
    return cast_like((1 - a).sqrt(), x_t) * x_t + cast_like(a.sqrt(), x_t) * v


def model_output_to_x0_eps(
    output: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: Coefficient, parameterization: str = "eps"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(pred_x0, pred_eps)`` from a model output that predicts ``parameterization`` in {eps, x0, v}."""
    check_parameterization(parameterization)
    if output.shape != x_t.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} != x_t shape {tuple(x_t.shape)}")
    if parameterization == "eps":
        return predict_x0_from_eps(x_t, output, alpha_cumprod), output
    if parameterization == "x0":
        return output, predict_eps_from_x0(x_t, output, alpha_cumprod)
    return predict_x0_from_v(x_t, output, alpha_cumprod), predict_eps_from_v(x_t, output, alpha_cumprod)


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: Coefficient, parameterization: str):
    """What a model of ``parameterization`` regresses to: ``noise`` (eps), ``x0`` or ``get_v(x0, noise, abar)``."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    return get_v(x0, noise, alpha_cumprod)


def matched_filter_snr(signal: torch.Tensor, alpha_cumprod: float) -> float:
    """How visible a known latent pattern ``signal`` (e.g. one object's ``z - z_background``) still is in
    ``x_t = sqrt(abar) (z_background + signal) + sqrt(1 - abar) eps``: the squared signal-to-noise ratio of the
    best linear detector ``<x_t, signal> / ||signal||``, ``abar ||signal||^2 / (1 - abar)``.

    At ``t = T`` it should be << 1: otherwise training teaches the model to read the pattern off ``x_T``, which
    sampling (from pure noise) never provides.
    """
    a = float(alpha_cumprod)
    return a * float(signal.double().pow(2).sum()) / (1.0 - a)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` in nats (broadcasting):
    ``0.5 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1)``."""
    logvar1 = torch.as_tensor(logvar1)
    logvar2 = torch.as_tensor(logvar2)
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_variance) -> torch.Tensor:
    """Elementwise ``log N(x; mean, e^log_variance) = -0.5 (log 2 pi + logvar + (x - mean)^2 e^-logvar)``."""
    log_variance = torch.as_tensor(log_variance)
    return -0.5 * (math.log(2 * math.pi) + log_variance + (x - mean) ** 2 * torch.exp(-log_variance))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF ``Phi(x) = 0.5 (1 + erf(x / sqrt 2))``."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def standard_normal_sf(x: torch.Tensor) -> torch.Tensor:
    """Survival function ``1 - Phi(x) = 0.5 erfc(x / sqrt 2)``, accurate in the upper tail."""
    return 0.5 * torch.erfc(x / math.sqrt(2.0))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale, bin_width: float = 2.0 / 255.0
) -> torch.Tensor:
    """DDPM's decoder for 8-bit data scaled to [-1, 1]: log of the Gaussian mass of the pixel's bin.

    ``log P(x) = log(Phi((x + w/2 - mean)/s) - Phi((x - w/2 - mean)/s))`` with ``s = e^log_scale`` and bin width
    ``w = 2/255``; the edge bins extend to -inf (``x <= -1 + w/2``) and +inf (``x >= 1 - w/2``). Elementwise.
    """
    log_scale = torch.as_tensor(log_scale)
    inv_scale = torch.exp(-log_scale)
    half = bin_width / 2
    cdf_plus = standard_normal_cdf(inv_scale * (x - mean + half))
    cdf_min = standard_normal_cdf(inv_scale * (x - mean - half))
    tiny = 1e-12
    log_cdf_plus = torch.log(cdf_plus.clamp(min=tiny))
    log_one_minus_cdf_min = torch.log(standard_normal_sf(inv_scale * (x - mean - half)).clamp(min=tiny))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=tiny))
    return torch.where(
        x <= -1.0 + half, log_cdf_plus, torch.where(x >= 1.0 - half, log_one_minus_cdf_min, log_delta)
    )
