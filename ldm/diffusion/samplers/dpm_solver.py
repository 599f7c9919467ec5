"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Algorithm 2), in the sigma variable as k-diffusion's ``sample_dpmpp_2m``.

With ``lambda = -log sigma`` (the half log-SNR: ``log(sqrt(abar) / sqrt(1 - abar))``) and the data prediction ``D``,
the exact solution of the probability-flow ODE in ``x = x_t / sqrt(abar)`` is
``x_next = (sigma_next / sigma) x + sigma_next int_lambda^lambda_next e^l D dl``. The multistep solver approximates
``D`` as linear in ``lambda`` from the current and the previous evaluation: one model evaluation per step,
second order. See :func:`dpmpp_2m_step`; sampler arguments as :class:`~ldm.diffusion.samplers.karras.KarrasSampler`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import gaussian
from ..gaussian import Coefficient, as_coefficient, cast_like
from .karras import KarrasSampler
from .registry import register_sampler


def dpmpp_2m_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: Coefficient,
    sigma_next: Coefficient,
    previous_denoised: Optional[torch.Tensor] = None,
    sigma_previous: Optional[Coefficient] = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step ``sigma -> sigma_next`` (< sigma)::

        h = lambda_next - lambda = log(sigma / sigma_next),   h_last = log(sigma_previous / sigma),  r = h_last / h
        D' = D + (D - D_previous) / (2 r)              (second order; D' = D at the first step or when sigma_next = 0)
        x_next = (sigma_next / sigma) x - expm1(-h) D'  = (sigma_next / sigma) x + (1 - sigma_next / sigma) D'

    (Lu et al. Algorithm 2 with ``alpha = 1``, the sigma variable; ``D' = (1 + 1/(2r)) D - 1/(2r) D_previous``.) The
    step to ``sigma_next = 0`` returns ``D`` exactly. x, denoised, previous_denoised ``[B, ...]``; sigmas numbers or
    ``[B]``. ``previous_denoised`` and ``sigma_previous`` go together.
    """
    gaussian._check_broadcast(x, denoised)
    if (previous_denoised is None) != (sigma_previous is None):
        raise ValueError("pass previous_denoised and sigma_previous together (or neither, for a first-order step)")
    s = as_coefficient(sigma, x, "sigma")
    s_next = as_coefficient(sigma_next, x, "sigma_next")
    if bool((s_next >= s).any()) or bool((s_next < 0).any()):
        raise ValueError("dpmpp_2m_step needs 0 <= sigma_next < sigma")
    h = s.log() - s_next.log()  # +inf where sigma_next = 0
    if previous_denoised is not None:
        gaussian._check_broadcast(x, previous_denoised)
        s_prev = as_coefficient(sigma_previous, x, "sigma_previous")
        if bool((s_prev <= s).any()):
            raise ValueError("dpmpp_2m_step needs sigma_previous > sigma")
        h_last = s_prev.log() - s.log()
        # 1/(2r) = h / (2 h_last); no correction on the step to sigma = 0 (h = inf), as k-diffusion.
        c = torch.where(s_next > 0, h / (2 * h_last), torch.zeros_like(h))
        denoised = denoised + cast_like(c, x) * (denoised - previous_denoised)
    return cast_like((-h).exp(), x) * x + cast_like(-torch.expm1(-h), x) * denoised


@register_sampler("dpmpp_2m")
class DPMSolverPP2MSampler(KarrasSampler):
    """DPM-Solver++(2M): deterministic, one model evaluation per step, the first step (and the last, to
    ``sigma = 0``) first order. Default ``num_steps=25`` with Karras sigmas, as k-diffusion / A1111's
    "DPM++ 2M Karras". Arguments: :class:`~ldm.diffusion.samplers.karras.KarrasSampler`."""

    def sigma_step(self, index, x, denoised, previous_denoised, denoise_next, generator):
        sigma, sigma_next = self._sigmas[index], self._sigmas[index + 1]
        sigma_previous = self._sigmas[index - 1] if previous_denoised is not None else None
        return dpmpp_2m_step(x, denoised, sigma, sigma_next, previous_denoised, sigma_previous)
