"""DDIM sampling (Song et al. 2021), step for step as CompVis/Stability-AI ``ldm/models/diffusion/ddim.py``.

A step from ``abar_t`` to ``abar_prev`` (eq. 12)::

    sigma^2 = eta^2 (1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev)
    x_prev  = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps_pred + sigma z

``eta = 0`` is deterministic; ``eta = 1`` gives ``sigma^2 = beta~`` of the (respaced) DDPM chain, so with all ``T``
steps DDIM(eta=1) is DDPM ancestral sampling with ``beta~``.

As in CompVis, the step after the smallest timestep goes to ``abar_prev = alphas_cumprod[0]`` (not 1): the result
is at the noise level of ``t = 0`` (sqrt(1 - abar_0) ~ 0.03 for Stable Diffusion), not exactly the predicted x0.
``set_alpha_to_one=True`` (diffusers' option) ends at ``abar_prev = 1`` instead, i.e. returns the last x0 prediction.
"""

from __future__ import annotations

from numbers import Real
from typing import Optional

import torch

from .. import gaussian
from ..gaussian import Coefficient, as_coefficient, cast_like
from .base import Sampler, make_timesteps
from .registry import register_sampler

# 1 - abar_prev - sigma^2 is >= 0 analytically for eta <= 1; allow float64 rounding below 0.
_NEGATIVE_TOLERANCE = 1e-12


def ddim_sigma(alpha_cumprod: Coefficient, alpha_cumprod_prev: Coefficient, eta: float) -> torch.Tensor:
    """Float64 ``sigma = eta sqrt((1 - abar_prev)/(1 - abar) (1 - abar/abar_prev))`` (DDIM eq. 16)."""
    a = torch.as_tensor(alpha_cumprod, dtype=torch.float64)
    a_prev = torch.as_tensor(alpha_cumprod_prev, dtype=torch.float64)
    return eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()


def ddim_step(
    x_t: torch.Tensor,
    pred_x0: torch.Tensor,
    pred_eps: torch.Tensor,
    alpha_cumprod_t: Coefficient,
    alpha_cumprod_prev: Coefficient,
    eta: float = 0.0,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x_prev = sqrt(abar_prev) pred_x0 + sqrt(1 - abar_prev - sigma^2) pred_eps + sigma noise``.

    ``sigma`` from :func:`ddim_sigma`. x_t (sets dtype/device), pred_x0, pred_eps, noise: ``[B, ...]``;
    coefficients numbers or ``[B]``. ``noise`` is required when ``sigma > 0``.
    """
    gaussian._check_broadcast(x_t, pred_x0, pred_eps)
    _check_eta(eta)
    a = as_coefficient(alpha_cumprod_t, x_t, "alpha_cumprod_t")
    a_prev = as_coefficient(alpha_cumprod_prev, x_t, "alpha_cumprod_prev")
    sigma = ddim_sigma(a, a_prev, eta)
    direction = 1 - a_prev - sigma**2
    if bool((direction < -_NEGATIVE_TOLERANCE).any()):
        raise ValueError(f"eta={eta} too large for this step: 1 - abar_prev - sigma^2 < 0")
    x_prev = cast_like(a_prev.sqrt(), x_t) * pred_x0 + cast_like(direction.clamp(min=0).sqrt(), x_t) * pred_eps
    if bool((sigma > 0).any()):
        if noise is None:
            raise ValueError("ddim_step with sigma > 0 (eta > 0) needs noise")
        gaussian._check_broadcast(x_t, noise)
        x_prev = x_prev + cast_like(sigma, x_t) * noise
    return x_prev


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, Real) or not eta >= 0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    return float(eta)


@register_sampler("ddim")
class DDIMSampler(Sampler):
    """DDIM sampler.

    Args:
        schedule: the :class:`ldm.diffusion.NoiseSchedule`.
        num_steps: number of steps (each one model evaluation), 1..T.
        eta: 0 deterministic; 1 DDPM-like (``sigma^2 = beta~`` of the respaced chain).
        parameterization, clip_denoised, guidance_rescale, guidance_interval: see
            :class:`~ldm.diffusion.samplers.base.Sampler`.
        timestep_spacing: ``leading`` (Stable Diffusion: 981, 961, ..., 1 for 50 of 1000), ``trailing`` (starts at
            T-1; use it with zero terminal SNR) or ``linspace``; see :func:`make_timesteps`.
        steps_offset: offset of ``leading`` spacing (1 as in Stable Diffusion).
        set_alpha_to_one: the last step goes to ``abar = 1`` instead of CompVis's ``alphas_cumprod[0]``.
    """

    def __init__(
        self,
        schedule,
        num_steps: int = 50,
        eta: float = 0.0,
        parameterization: str = "eps",
        clip_denoised: Optional[float] = None,
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        guidance_rescale: float = 0.0,
        guidance_interval: Optional[tuple] = None,
    ):
        super().__init__(schedule, parameterization=parameterization, clip_denoised=clip_denoised,
                         guidance_rescale=guidance_rescale, guidance_interval=guidance_interval)
        self.eta = _check_eta(eta)
        self.timestep_spacing = timestep_spacing
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self._timesteps = make_timesteps(schedule.num_timesteps, num_steps, timestep_spacing, steps_offset)
        abar = self._alphas_cumprod[self._timesteps]
        final = torch.ones(1, dtype=torch.float64) if set_alpha_to_one else self._alphas_cumprod[:1]
        self._abar_t = abar
        self._abar_prev = torch.cat([abar[1:], final])
        self._sigmas = ddim_sigma(self._abar_t, self._abar_prev, self.eta)
        direction = 1 - self._abar_prev - self._sigmas**2
        if bool((direction < -_NEGATIVE_TOLERANCE).any()):
            raise ValueError(f"eta={eta} is too large for these timesteps (sigma^2 > 1 - abar_prev); use eta <= 1")
        self._check_guidance_interval_grid()

    @property
    def variances(self) -> torch.Tensor:
        """Float64 ``sigma^2`` of each step ``[num_steps]``."""
        return self._sigmas.clone() ** 2

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """Float64 ``abar_prev`` of each step ``[num_steps]`` (the last is ``alphas_cumprod[0]`` or 1)."""
        return self._abar_prev.clone()

    def step(self, index, x_t, pred_x0, pred_eps, generator=None):
        noise = gaussian.randn_like(x_t, generator) if self._sigmas[index] > 0 else None
        return ddim_step(x_t, pred_x0, pred_eps, self._abar_t[index], self._abar_prev[index], self.eta, noise)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", eta={self.eta}, timestep_spacing={self.timestep_spacing!r})"
