"""Beta schedules for the discrete DDPM forward process, computed in float64.

The forward process adds Gaussian noise in ``T`` steps, ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``
for ``t = 0 .. T-1`` (0-based, as in the DDPM and Stable Diffusion code), so that
``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with ``abar_t = prod_{s<=t} (1 - beta_s)``.

Schedules here return ``betas`` as a float64 tensor of shape ``[T]``:

* ``linear`` (Ho et al. 2020): ``beta_t`` linear from 1e-4 to 0.02.
* ``scaled_linear`` (Stable Diffusion): ``sqrt(beta_t)`` linear from sqrt(0.00085) to sqrt(0.012).
* ``cosine`` (Nichol & Dhariwal 2021): ``abar(t) = cos^2(pi/2 (t/T + s)/(1 + s))`` with ``s = 0.008``,
  ``beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999)``.

``rescale_zero_terminal_snr`` (Lin et al. 2024, Algorithm 1) shifts and scales ``sqrt(abar)`` so that
``abar_{T-1} = 0`` exactly while ``abar_0`` is unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")

DEFAULT_BETA_ENDPOINTS = {
    "linear": (1e-4, 2e-2),
    "scaled_linear": (0.00085, 0.012),
}

COSINE_S = 0.008
COSINE_MAX_BETA = 0.999


def _check_num_timesteps(num_timesteps: int) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    return num_timesteps


def _check_endpoints(kind: str, beta_start: float, beta_end: float) -> None:
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not (isinstance(value, (int, float)) and 0.0 < float(value) < 1.0):
            raise ValueError(f"{kind} schedule: {name} must be a number in (0, 1), got {value!r}")
    if beta_start > beta_end:
        raise ValueError(f"{kind} schedule: beta_start ({beta_start}) must be <= beta_end ({beta_end})")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """DDPM linear schedule: ``beta_t = beta_start + (beta_end - beta_start) t / (T - 1)``; float64 ``[T]``."""
    _check_num_timesteps(num_timesteps)
    _check_endpoints("linear", beta_start, beta_end)
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion schedule: ``sqrt(beta_t)`` linear from ``sqrt(beta_start)`` to ``sqrt(beta_end)``.

    ``beta_t = (sqrt(beta_start) + (sqrt(beta_end) - sqrt(beta_start)) t / (T - 1))^2``; float64 ``[T]``.
    """
    _check_num_timesteps(num_timesteps)
    _check_endpoints("scaled_linear", beta_start, beta_end)
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = COSINE_S, max_beta: float = COSINE_MAX_BETA) -> torch.Tensor:
    """Improved-DDPM cosine schedule; float64 ``[T]``.

    ``f(u) = cos^2(pi/2 (u + s) / (1 + s))``, ``abar(u) = f(u) / f(0)`` and
    ``beta_t = min(1 - abar((t + 1)/T) / abar(t/T), max_beta)`` for ``t = 0 .. T-1``. The clip keeps the last
    betas below 1 (near ``u = 1`` the ratio goes to 0 and ``beta`` to 1).
    """
    _check_num_timesteps(num_timesteps)
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: rescale ``betas`` so the last step has zero SNR (``abar_{T-1} = 0``).

    With ``r_t = sqrt(abar_t)``: ``r'_t = (r_t - r_{T-1}) r_0 / (r_0 - r_{T-1})``, so ``r'_0 = r_0`` and
    ``r'_{T-1} = 0``; then ``alpha'_t = r'^2_t / r'^2_{t-1}`` (``alpha'_0 = r'^2_0``) and ``beta' = 1 - alpha'``.
    The last beta becomes exactly 1. Input and output: float64 ``[T]``.

    At ``abar = 0`` converting an eps prediction to x0 divides by zero; :class:`ldm.diffusion.NoiseSchedule`
    therefore stores a tiny positive terminal ``abar`` (see ``terminal_alpha_cumprod`` there). Models for
    such schedules should use the v (or x0) parameterization.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    if not first > last:
        raise ValueError("cannot rescale to zero terminal SNR: abar_0 must be larger than abar_{T-1}")
    root = (root - last) * first / (first - last)
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


_rescale_zero_terminal_snr = rescale_zero_terminal_snr  # the keyword argument below shadows the name


def make_beta_schedule(
    kind: str,
    num_timesteps: int,
    beta_start: Optional[float] = None,
    beta_end: Optional[float] = None,
    rescale_zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """Betas (float64 ``[num_timesteps]``) of schedule ``kind`` in ``BETA_SCHEDULES``.

    ``beta_start``/``beta_end`` default per kind (linear: 1e-4, 0.02; scaled_linear: 0.00085, 0.012) and are
    meaningless for ``cosine`` (passing them is an error rather than being silently ignored).
    ``rescale_zero_terminal_snr`` applies Lin et al. 2024 Algorithm 1 (last beta == 1, ``abar_{T-1} == 0``).
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; valid kinds: {', '.join(BETA_SCHEDULES)}")
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule takes no beta_start/beta_end (it is defined by abar, s=0.008)")
        betas = cosine_betas(num_timesteps)
    else:
        default_start, default_end = DEFAULT_BETA_ENDPOINTS[kind]
        start = default_start if beta_start is None else beta_start
        end = default_end if beta_end is None else beta_end
        betas = linear_betas(num_timesteps, start, end) if kind == "linear" else scaled_linear_betas(
            num_timesteps, start, end
        )
    if rescale_zero_terminal_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas
