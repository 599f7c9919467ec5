"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2).

Each step draws ``x_prev ~ N(mu(x_t, x0_pred), sigma_t^2 I)`` with the posterior mean of
``q(x_prev | x_t, x0 = x0_pred)`` and ``sigma_t^2 = beta~_t`` (``variance="beta_tilde"``, exact for a point-mass
data distribution) or ``beta_t`` (``variance="beta"``, exact for ``x0 ~ N(0, I)``). The last step adds no noise.

With ``num_steps < T`` the chain is respaced (improved-DDPM): a step from ``abar_t`` to ``abar_prev`` uses
``beta = 1 - abar_t / abar_prev``. The step after the smallest timestep goes to ``abar_prev = 1`` (clean data).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import gaussian
from ..gaussian import Coefficient, as_coefficient, cast_like, posterior_coefficients
from .base import Sampler, make_timesteps
from .registry import register_sampler

DDPM_VARIANCES = ("beta_tilde", "beta")


def ddpm_step_variance(alpha_cumprod: Coefficient, alpha_cumprod_prev: Coefficient, variance: str = "beta_tilde"):
    """Float64 ``sigma^2`` of a step ``abar -> abar_prev``: ``beta~ = beta (1 - abar_prev)/(1 - abar)`` or
    ``beta = 1 - abar / abar_prev``."""
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; valid: {', '.join(DDPM_VARIANCES)}")
    a = torch.as_tensor(alpha_cumprod, dtype=torch.float64)
    a_prev = torch.as_tensor(alpha_cumprod_prev, dtype=torch.float64)
    if variance == "beta":
        return 1 - a / a_prev
    return posterior_coefficients(a, a_prev)[2]


def ddpm_step(
    x_t: torch.Tensor,
    pred_x0: torch.Tensor,
    alpha_cumprod: Coefficient,
    alpha_cumprod_prev: Coefficient,
    noise: Optional[torch.Tensor] = None,
    variance: str = "beta_tilde",
) -> torch.Tensor:
    """One ancestral step ``x_prev = c1 pred_x0 + c2 x_t + sigma noise``.

    ``c1 = sqrt(abar_prev) beta / (1 - abar)``, ``c2 = sqrt(alpha) (1 - abar_prev) / (1 - abar)`` with
    ``alpha = abar / abar_prev``, ``beta = 1 - alpha``; ``sigma^2`` from :func:`ddpm_step_variance`.
    ``noise=None`` returns the mean (the last step). Shapes: x_t, pred_x0, noise ``[B, ...]``; coefficients numbers
    or ``[B]``.
    """
    gaussian._check_broadcast(x_t, pred_x0)
    a = as_coefficient(alpha_cumprod, x_t, "alpha_cumprod")
    a_prev = as_coefficient(alpha_cumprod_prev, x_t, "alpha_cumprod_prev")
    c1, c2, _ = posterior_coefficients(a, a_prev)
    x_prev = cast_like(c1, x_t) * pred_x0 + cast_like(c2, x_t) * x_t
    if noise is not None:
        gaussian._check_broadcast(x_t, noise)
        x_prev = x_prev + cast_like(ddpm_step_variance(a, a_prev, variance).sqrt(), x_t) * noise
    return x_prev


@register_sampler("ddpm")
class DDPMSampler(Sampler):
    """DDPM ancestral sampler.

    Args:
        schedule: the :class:`ldm.diffusion.NoiseSchedule`.
        variance: ``beta_tilde`` (posterior variance) or ``beta``.
        parameterization, clip_denoised, guidance_rescale, guidance_interval: see
            :class:`~ldm.diffusion.samplers.base.Sampler`.
        num_steps: ``None`` for all ``T`` steps (``T-1 .. 0``); fewer respaces the chain.
        timestep_spacing, steps_offset: how a respaced chain picks timesteps (:func:`make_timesteps`); the default
            ``trailing`` starts at ``T-1``, the level ``x_T ~ N(0, I)`` matches.
    """

    def __init__(
        self,
        schedule,
        variance: str = "beta_tilde",
        parameterization: str = "eps",
        clip_denoised: Optional[float] = None,
        num_steps: Optional[int] = None,
        timestep_spacing: str = "trailing",
        steps_offset: int = 1,
        guidance_rescale: float = 0.0,
        guidance_interval: Optional[tuple] = None,
    ):
        super().__init__(schedule, parameterization=parameterization, clip_denoised=clip_denoised,
                         guidance_rescale=guidance_rescale, guidance_interval=guidance_interval)
        if variance not in DDPM_VARIANCES:
            raise ValueError(f"unknown DDPM variance {variance!r}; valid: {', '.join(DDPM_VARIANCES)}")
        self.variance = variance
        T = schedule.num_timesteps
        if num_steps is None:
            self._timesteps = torch.arange(T - 1, -1, -1, dtype=torch.int64)
        else:
            self._timesteps = make_timesteps(T, num_steps, timestep_spacing, steps_offset)
        abar = self._alphas_cumprod[self._timesteps]
        self._abar_t = abar
        self._abar_prev = torch.cat([abar[1:], torch.ones(1, dtype=torch.float64)])
        variances = ddpm_step_variance(self._abar_t, self._abar_prev, variance)
        variances[-1] = 0.0  # no noise at the last step
        self._variances = variances
        self._check_guidance_interval_grid()

    @property
    def variances(self) -> torch.Tensor:
        """Float64 ``sigma^2`` of each step ``[num_steps]`` (0 for the last)."""
        return self._variances.clone()

    def step(self, index, x_t, pred_x0, pred_eps, generator=None):
        noise = None
        if self._variances[index] > 0:
            noise = gaussian.randn_like(x_t, generator)
        return ddpm_step(x_t, pred_x0, self._abar_t[index], self._abar_prev[index], noise, self.variance)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", variance={self.variance!r})"
