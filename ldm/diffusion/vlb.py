"""The DDPM variational bound on ``-log p_theta(x0)``, term by term (Ho et al. 2020, eq. 5), in nats.

With 0-based timesteps ``t = 0 .. T-1`` (``x_t`` at noise level ``abar_t``)::

    -log p(x0) <= L_T + sum_{t=1}^{T-1} L_{t-1} + L_0
    L_T     = KL(q(x_{T-1} | x0) || N(0, I))                                   (prior; no parameters)
    L_{t-1} = E_{x_t ~ q(x_t | x0)} KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))  for t >= 1
    L_0     = E_{x_0' ~ q(x_{t=0} | x0)} -log p(x0 | x_0')                        (decoder)

``p(x_{t-1} | x_t) = N(mu(x_t, x0_pred), sigma_t^2)`` with the posterior mean at the model's x0 prediction and
``sigma_t^2 = beta~_t`` (``variance="beta_tilde"``; at t = 0, where beta~_0 = 0, beta~_1 as in DDPM's code) or
``beta_t`` (``variance="beta"``; the decoder then has variance beta_0, DDPM's sigma_1^2 = beta_1 in 1-based
notation). Each expectation is estimated with one draw of ``x_t`` per sample and timestep.

The decoder is a Gaussian density (``decoder="gaussian"``, continuous data: a bound on the differential entropy)
or DDPM's discretized Gaussian for 8-bit data scaled to [-1, 1] (``decoder="discretized"``: a bound on the
discrete negative log-likelihood, so :meth:`VariationalBound.bits_per_dim` is comparable to published bpd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from . import gaussian
from .gaussian import check_parameterization, randn_like
from .noise_schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

VLB_VARIANCES = ("beta_tilde", "beta")
VLB_DECODERS = ("gaussian", "discretized")


def nats_to_bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """``bits/dim = nats / (D ln 2)``."""
    if num_dims < 1:
        raise ValueError(f"num_dims must be >= 1, got {num_dims}")
    return nats / (num_dims * math.log(2.0))


@dataclass
class VariationalBound:
    """Terms of the bound, in nats per sample (summed over the data dims).

    prior: ``L_T`` ``[B]``. terms: ``[B, T]`` with ``terms[:, 0] = L_0`` (decoder) and ``terms[:, t] = L_{t-1}``
    for ``t >= 1``. total: ``prior + terms.sum(1)`` ``[B]``. num_dims: data dims per sample (for bits/dim).
    """

    prior: torch.Tensor
    terms: torch.Tensor
    total: torch.Tensor
    num_dims: int

    @property
    def decoder(self) -> torch.Tensor:
        """``L_0 = -log p(x0 | x_{t=0})`` ``[B]``."""
        return self.terms[:, 0]

    @property
    def kl_terms(self) -> torch.Tensor:
        """``L_{t-1}`` for ``t = 1 .. T-1``: ``[B, T-1]``."""
        return self.terms[:, 1:]

    def bits_per_dim(self) -> torch.Tensor:
        """``total`` in bits per dimension ``[B]``."""
        return nats_to_bits_per_dim(self.total, self.num_dims)


def _sum_dims(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def prior_kl(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """``L_T = KL(N(sqrt(abar_{T-1}) x0, 1 - abar_{T-1}) || N(0, I))`` summed over dims, ``[B]``."""
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=torch.int64, device=x0.device)
    mean, var = schedule.q_mean_variance(x0, t)
    kl = gaussian.normal_kl(mean, torch.log(var), torch.zeros_like(mean), torch.zeros_like(mean))
    return _sum_dims(kl)


def _model_log_variance(schedule: NoiseSchedule, variance: str) -> torch.Tensor:
    if variance == "beta_tilde":
        return schedule.posterior_log_variance_clipped
    return torch.log(schedule.betas)


def variational_bound(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    cond: Any = None,
    parameterization: str = "eps",
    variance: str = "beta_tilde",
    decoder: str = "gaussian",
    clip_denoised: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> VariationalBound:
    """Every term of the variational bound for ``x0 [B, ...]``; one ``model_fn`` call (batch B) per timestep.

    Args:
        model_fn: ``model_fn(x_t, t [B] int64, cond) -> output`` predicting ``parameterization``.
        variance: reverse-process variance ``beta_tilde`` or ``beta``.
        decoder: ``gaussian`` (continuous data) or ``discretized`` (8-bit data in [-1, 1]).
        clip_denoised: clamp the x0 prediction to ``[-c, c]`` before forming the reverse mean.
        generator: source of the ``x_t`` draws.
    Returns a :class:`VariationalBound` in nats (compute in the dtype of ``x0``; use float64 for checks).
    """
    check_parameterization(parameterization)
    if variance not in VLB_VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VLB_VARIANCES)}")
    if decoder not in VLB_DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; valid: {', '.join(VLB_DECODERS)}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError("x0 must be a non-empty floating-point batch [B, ...]")
    batch = x0.shape[0]
    num_dims = x0[0].numel()
    model_log_var = _model_log_variance(schedule, variance)
    terms = []
    for t_int in tqdm(range(schedule.num_timesteps), desc="vlb", disable=not progress, leave=False):
        t = torch.full((batch,), t_int, dtype=torch.int64, device=x0.device)
        x_t = schedule.q_sample(x0, t, randn_like(x0, generator))
        output = model_fn(x_t, t, cond)
        pred_x0, _ = schedule.model_output_to_x0_eps(output, x_t, t, parameterization)
        if clip_denoised is not None:
            pred_x0 = pred_x0.clamp(-clip_denoised, clip_denoised)
        model_mean, _, _ = schedule.q_posterior(pred_x0, x_t, t)
        log_var = model_log_var[t_int].to(device=x0.device, dtype=x0.dtype)
        if t_int == 0:
            if decoder == "gaussian":
                log_p = gaussian.gaussian_log_prob(x0, model_mean, log_var)
            else:
                log_p = gaussian.discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var)
            terms.append(-_sum_dims(log_p))
        else:
            true_mean, _, true_log_var = schedule.q_posterior(x0, x_t, t)
            terms.append(_sum_dims(gaussian.normal_kl(true_mean, true_log_var, model_mean, log_var)))
    terms = torch.stack(terms, dim=1)
    prior = prior_kl(schedule, x0)
    return VariationalBound(prior=prior, terms=terms, total=prior + terms.sum(dim=1), num_dims=num_dims)
