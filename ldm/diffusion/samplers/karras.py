"""Samplers in the sigma formulation of Karras et al. (2022) ("EDM", k-diffusion's convention).

A DDPM state ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` divided by ``sqrt(abar_t)`` is the variance-exploding
variable ::

    x = x_t / sqrt(abar_t) = x0 + sigma_t eps,      sigma_t = sqrt((1 - abar_t) / abar_t),
    x_t = x / sqrt(1 + sigma^2)                      (abar = 1 / (1 + sigma^2)),

and the probability-flow ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma`` with the denoiser ``D`` = the model's x0
prediction. The samplers here step ``x`` through a decreasing grid ``sigma_0 > ... > sigma_{n-1} > sigma_n = 0`` and
convert back to DDPM space for every ``model_fn`` call, so they drive the same ``model_fn(x_t, t, cond)`` as
DDPM / DDIM. Their output is ``x`` at ``sigma = 0``: the denoised sample x0 itself.

Timesteps given to ``model_fn``:

* ``sigma_spacing="uniform"``: the grid is ``sigma`` at the DDPM timesteps of ``trailing`` spacing (T-1 down, see
  :func:`~ldm.diffusion.samplers.base.make_timesteps`); ``t`` is an int64 ``[B]`` tensor, as for DDIM.
* ``sigma_spacing="karras"``: the grid falls between DDPM timesteps; ``t`` is a *fractional* float ``[B]`` tensor
  (float64 for float64 ``x``, else float32), found by linear interpolation of ``log sigma`` between the
  neighbouring integer timesteps (k-diffusion ``DiscreteSchedule.sigma_to_t``, :func:`sigma_to_t`). The UNet's
  sinusoidal embedding takes float timesteps; a ``model_fn`` that indexes tables by ``t`` must interpolate the same
  way (:func:`t_to_sigma`).

The noise ``x_T ~ N(0, I)`` is given in DDPM space at the first noise level, as for the other samplers; it is
mapped exactly, ``x = x_T sqrt(1 + sigma_0^2)`` (not the large-sigma approximation ``sigma_0 x_T``).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Callable, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import gaussian
from ..gaussian import Coefficient, as_coefficient, cast_like
from .base import Callback, ModelFn, Sampler, make_timesteps
from .ddim import _check_eta
from .registry import register_sampler

SIGMA_SPACINGS = ("karras", "uniform")

# A user sigma_min / sigma_max may exceed the schedule's range by float rounding (e.g. a value printed to 6 digits).
_SIGMA_RANGE_RTOL = 1e-4


# -- sigma <-> DDPM quantities -----------------------------------------------------------------------------------------


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Float64 ``[n + 1]`` noise levels of Karras et al. (2022) eq. 5, then a final 0::

        sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,   i = 0 .. n-1

    (``n = 1`` gives ``[sigma_max, 0]``). Requires ``0 < sigma_min < sigma_max`` and ``rho > 0``.
    """
    n = _check_num_steps(n)
    rho = _check_rho(rho)
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``sigma_t = sqrt((1 - abar_t) / abar_t)`` (float64, shape of the input)."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - a) / a).sqrt()


def sigma_to_alpha_cumprod(sigma: Coefficient) -> torch.Tensor:
    """``abar = 1 / (1 + sigma^2)`` (float64, shape of the input); ``sigma = 0`` gives 1."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return 1 / (1 + s**2)


def sigma_to_t(sigma: Coefficient, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional DDPM timestep of noise level ``sigma`` (k-diffusion ``DiscreteSchedule.sigma_to_t``).

    ``log_sigmas [T]`` is ``log sigma_t`` of the integer timesteps, increasing in ``t``. With ``lo`` the last
    timestep whose ``log sigma`` is ``<= log sigma`` (clamped to ``0 .. T-2``)::

        w = (log sigma - log_sigmas[lo]) / (log_sigmas[lo+1] - log_sigmas[lo]),   t = lo + clamp(w, 0, 1)

    so ``t`` is clamped to ``[0, T-1]``. Float64, shape of ``sigma``. Inverse of :func:`t_to_sigma` on ``[0, T-1]``.
    """
    log_sigmas = torch.as_tensor(log_sigmas, dtype=torch.float64)
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).to(log_sigmas.device).log()
    low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, log_sigmas.shape[0] - 2)
    low_value, high_value = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_sigma.reshape(-1) - low_value) / (high_value - low_value)).clamp(0, 1)
    return (low.to(torch.float64) + w).reshape(log_sigma.shape)


def t_to_sigma(t: Coefficient, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Noise level at a fractional timestep ``t`` in ``[0, T-1]``: ``log sigma`` interpolated linearly between
    ``floor(t)`` and ``ceil(t)`` (k-diffusion ``DiscreteSchedule.t_to_sigma``). Float64, shape of ``t``."""
    log_sigmas = torch.as_tensor(log_sigmas, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64).to(log_sigmas.device)
    if bool((t < 0).any()) or bool((t > log_sigmas.shape[0] - 1).any()):
        raise ValueError(f"t must lie in [0, {log_sigmas.shape[0] - 1}]")
    low = t.floor().long()
    high = t.ceil().long()
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def to_d(x: torch.Tensor, sigma: Coefficient, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative ``dx/dsigma = (x - D(x, sigma)) / sigma``. x, denoised ``[B, ...]``;
    sigma a number or ``[B]`` (> 0)."""
    gaussian._check_broadcast(x, denoised)
    s = as_coefficient(sigma, x, "sigma")
    return (x - denoised) * cast_like(1 / s, x)


# -- per-step math -----------------------------------------------------------------------------------------------------


def get_ancestral_step(
    sigma_from: Coefficient, sigma_to: Coefficient, eta: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split an ancestral step ``sigma_from -> sigma_to`` into a deterministic part down to ``sigma_down`` and fresh
    noise of std ``sigma_up`` (k-diffusion ``get_ancestral_step``)::

        sigma_up   = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))
        sigma_down = sqrt(sigma_to^2 - sigma_up^2)

    ``eta = 1`` is the DDPM posterior (DDIM eta = 1) step; ``eta = 0`` is deterministic. Float64 ``(sigma_down,
    sigma_up)`` of the broadcast shape of the inputs.
    """
    eta = _check_eta(eta)
    s_from = torch.as_tensor(sigma_from, dtype=torch.float64)
    s_to = torch.as_tensor(sigma_to, dtype=torch.float64)
    up = eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2).clamp(min=0).sqrt()
    up = torch.minimum(up, s_to)
    down = (s_to**2 - up**2).clamp(min=0).sqrt()
    return down, up


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: Coefficient, sigma_next: Coefficient) -> torch.Tensor:
    """Euler step of the probability-flow ODE: ``x + (sigma_next - sigma) (x - D) / sigma``.

    Equivalently ``D + (sigma_next / sigma) (x - D)``, which is the DDIM (eta = 0) step; with ``sigma_next = 0`` it
    returns ``D``. Shapes: x, denoised ``[B, ...]``; sigmas numbers or ``[B]``.
    """
    gaussian._check_broadcast(x, denoised)
    s = as_coefficient(sigma, x, "sigma")
    s_next = as_coefficient(sigma_next, x, "sigma_next")
    return denoised + cast_like(s_next / s, x) * (x - denoised)


def euler_ancestral_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: Coefficient,
    sigma_next: Coefficient,
    eta: float = 1.0,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Euler-ancestral step (k-diffusion ``sample_euler_ancestral``)::

        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x_next = x + (sigma_down - sigma) (x - D) / sigma + sigma_up noise

    With ``eta = 1`` this is exactly the DDIM eta = 1 (DDPM posterior) step of the respaced chain written in the
    sigma variable. ``noise [B, ...]`` is required when ``sigma_up > 0``. Shapes as :func:`euler_step`.
    """
    gaussian._check_broadcast(x, denoised)
    s = as_coefficient(sigma, x, "sigma")
    down, up = get_ancestral_step(s, as_coefficient(sigma_next, x, "sigma_next"), eta)
    x_next = euler_step(x, denoised, s, down)
    if bool((up > 0).any()):
        if noise is None:
            raise ValueError("euler_ancestral_step with sigma_up > 0 (eta > 0, sigma_next > 0) needs noise")
        gaussian._check_broadcast(x, noise)
        x_next = x_next + cast_like(up, x) * noise
    return x_next


def heun_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    x_euler: torch.Tensor,
    denoised_euler: torch.Tensor,
    sigma: Coefficient,
    sigma_next: Coefficient,
) -> torch.Tensor:
    """Heun (trapezoidal) correction, Karras et al. (2022) Algorithm 1 with ``S_churn = 0``::

        d       = (x - D(x, sigma)) / sigma
        x_euler = x + (sigma_next - sigma) d                       (:func:`euler_step`)
        d'      = (x_euler - D(x_euler, sigma_next)) / sigma_next
        x_next  = x + (sigma_next - sigma) (d + d') / 2

    ``denoised_euler = D(x_euler, sigma_next)`` is the second model evaluation. Needs ``sigma_next > 0`` (the last
    step, to 0, is a plain Euler step). All tensors ``[B, ...]``; sigmas numbers or ``[B]``.
    """
    gaussian._check_broadcast(x, denoised, x_euler, denoised_euler)
    s = as_coefficient(sigma, x, "sigma")
    s_next = as_coefficient(sigma_next, x, "sigma_next")
    if bool((s_next <= 0).any()):
        raise ValueError("heun_step needs sigma_next > 0; the step to sigma = 0 is an Euler step")
    d_mean = (to_d(x, s, denoised) + to_d(x_euler, s_next, denoised_euler)) / 2
    return x + cast_like(s_next - s, x) * d_mean


# -- the samplers ------------------------------------------------------------------------------------------------------


class KarrasSampler(Sampler):
    """Base class of the sigma-space samplers (not registered itself).

    Args:
        schedule: the :class:`ldm.diffusion.NoiseSchedule`.
        num_steps: number of steps ``n`` in ``1 .. T`` (noise levels ``sigma_0 .. sigma_{n-1}``, then 0).
        parameterization, clip_denoised, guidance_rescale, guidance_interval: see
            :class:`~ldm.diffusion.samplers.base.Sampler` (the band is compared with the grid's own sigmas).
        sigma_spacing: ``karras`` (default; :func:`karras_sigmas`) or ``uniform`` (the ``trailing`` DDPM timesteps
            ``round(T - i T/n) - 1``: 999, 979, ..., 19 for 50 of 1000, as diffusers' ``timestep_spacing="trailing"``;
            integer ``t``).
        rho: Karras exponent (> 0; 7 as in the paper).
        sigma_min, sigma_max: ends of the Karras grid; default to the schedule's ``sigma_0`` and ``sigma_{T-1}``,
            and must lie in that range (a level outside it has no timestep for the model). ``karras`` only.

    ``sample`` runs ``x = x_T sqrt(1 + sigma_0^2)``, then for each ``i``: one evaluation ``D_i = D(x, sigma_i)``,
    ``callback(i, t_i, x_t, D_i)`` (``x_t`` in DDPM space) and :meth:`sigma_step`. It returns ``x`` at ``sigma = 0``.
    """

    def __init__(
        self,
        schedule,
        num_steps: int = 25,
        parameterization: str = "eps",
        clip_denoised: Optional[float] = None,
        sigma_spacing: str = "karras",
        rho: float = 7.0,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        guidance_rescale: float = 0.0,
        guidance_interval: Optional[tuple] = None,
    ):
        super().__init__(schedule, parameterization=parameterization, clip_denoised=clip_denoised,
                         guidance_rescale=guidance_rescale, guidance_interval=guidance_interval)
        if sigma_spacing not in SIGMA_SPACINGS:
            raise ValueError(f"unknown sigma_spacing {sigma_spacing!r}; valid: {', '.join(SIGMA_SPACINGS)}")
        T = schedule.num_timesteps
        num_steps = _check_num_steps(num_steps, T)
        self.rho = _check_rho(rho)
        self.sigma_spacing = sigma_spacing
        table = sigmas_from_alphas_cumprod(self._alphas_cumprod)
        if not bool((table[1:] > table[:-1]).all()):
            raise ValueError("the schedule's sigma_t must increase strictly with t")
        self._log_sigmas = table.log()
        if sigma_spacing == "uniform":
            if sigma_min is not None or sigma_max is not None:
                raise ValueError("sigma_min / sigma_max apply to sigma_spacing='karras' only")
            timesteps = make_timesteps(T, num_steps, "trailing")
            self._sigmas = torch.cat([table[timesteps], table.new_zeros(1)])
            self._timesteps = timesteps
        else:
            lo, hi = float(table[0]), float(table[-1])
            sigma_min = lo if sigma_min is None else _check_sigma("sigma_min", sigma_min, lo, hi)
            sigma_max = hi if sigma_max is None else _check_sigma("sigma_max", sigma_max, lo, hi)
            if not sigma_min < sigma_max:
                raise ValueError(f"need sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
            self._sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, self.rho)
            self._timesteps = sigma_to_t(self._sigmas[:-1], self._log_sigmas)
        self._check_guidance_interval_grid()

    # -- description -------------------------------------------------------------------------------------------------

    @property
    def sigmas(self) -> torch.Tensor:
        """Float64 noise levels ``[num_steps + 1]``, decreasing, the last 0 (a copy)."""
        return self._sigmas.clone()

    @property
    def step_sigmas(self) -> torch.Tensor:
        """Float64 noise levels of the steps' first model evaluations, ``sigmas[:-1]`` (Heun's second evaluation of
        a step is at the next step's level)."""
        return self._sigmas[:-1].clone()

    @property
    def timesteps(self) -> torch.Tensor:
        """DDPM timesteps of ``sigmas[:-1]``: int64 for ``uniform`` spacing, fractional float64 for ``karras``."""
        return self._timesteps.clone()

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", sigma_spacing={self.sigma_spacing!r}, rho={self.rho})"

    # -- one model evaluation ----------------------------------------------------------------------------------------

    def denoise_sigma(self, model_fn: ModelFn, x: torch.Tensor, index: int, cond: Any = None) -> torch.Tensor:
        """``D(x, sigma_index)``: one ``model_fn`` call on ``x_t = x / sqrt(1 + sigma^2)`` at timestep ``t_index``,
        converted to the x0 prediction with ``abar = 1 / (1 + sigma^2)`` (clamped with ``clip_denoised``)."""
        sigma = self._sigmas[index]
        abar = sigma_to_alpha_cumprod(sigma)
        x_t = cast_like(abar.sqrt(), x) * x
        t = self._timesteps[index]
        t_dtype = torch.int64 if not t.is_floating_point() else torch.promote_types(x.dtype, torch.float32)
        t_batch = t.to(t_dtype).expand(x.shape[0]).to(x.device)
        output = model_fn(x_t, t_batch, cond)
        if not isinstance(output, torch.Tensor) or output.shape != x_t.shape:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"model_fn returned {shape}; expected a tensor of the shape of x_t {tuple(x_t.shape)}")
        pred_x0, _ = gaussian.model_output_to_x0_eps(output, x_t, abar, self.parameterization)
        if self.clip_denoised is not None:
            pred_x0 = pred_x0.clamp(-self.clip_denoised, self.clip_denoised)
        return pred_x0

    def sigma_step(
        self,
        index: int,
        x: torch.Tensor,
        denoised: torch.Tensor,
        previous_denoised: Optional[torch.Tensor],
        denoise_next: Callable[[torch.Tensor], torch.Tensor],
        generator: Optional[torch.Generator],
    ) -> torch.Tensor:
        """``x`` at ``sigmas[index]`` -> ``x`` at ``sigmas[index + 1]``.

        ``denoised = D(x, sigmas[index])``; ``previous_denoised`` is the ``D`` of the previous step (None at the
        first; multistep solvers use it); ``denoise_next(x')`` evaluates ``D(x', sigmas[index + 1])`` (one more
        model call; only valid while ``sigmas[index + 1] > 0``).
        """
        raise NotImplementedError

    def step(self, index, x_t, pred_x0, pred_eps, generator=None):
        raise NotImplementedError(f"{type(self).__name__} steps in sigma space; see sigma_step")

    # -- the loop ----------------------------------------------------------------------------------------------------

    def input_alpha_cumprod(self, index: int) -> torch.Tensor:
        """``abar = 1 / (1 + sigma^2)`` of the grid's noise level ``index`` (float64 0-d)."""
        return sigma_to_alpha_cumprod(self._sigmas[index])

    def sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        cond: Any = None,
        generator: Optional[torch.Generator] = None,
        progress: bool = True,
        callback: Optional[Callback] = None,
        first_step: int = 0,
        guide=None,
        last_step: Optional[int] = None,
    ) -> torch.Tensor:
        """Solve from ``x_T`` (DDPM space, standard normal at ``sigma_0``, or the state entering ``first_step``) to
        ``sigma = 0``; returns x0 ``[B, ...]``."""
        self.check_x_T(x_T)
        first_step = self.check_first_step(first_step)
        last_step = self.check_last_step(first_step, last_step)
        model_fn = self.guided_model_fn(model_fn)
        x = cast_like((1 + self._sigmas[first_step] ** 2).sqrt(), x_T) * x_T
        previous = None  # a multistep solver starting part-way begins with a first-order step, as at sigma_0
        timesteps = self._timesteps.tolist()
        for index in tqdm(range(first_step, last_step), desc=type(self).__name__, disable=not progress,
                          leave=False):
            if guide is not None:  # the guide works in DDPM space, x_t = x / sqrt(1 + sigma^2)
                scale = cast_like((1 + self._sigmas[index] ** 2).sqrt(), x)
                x = guide(index, x / scale) * scale
            denoised = self.denoise_sigma(model_fn, x, index, cond)
            if callback is not None:
                x_t = cast_like(sigma_to_alpha_cumprod(self._sigmas[index]).sqrt(), x) * x
                callback(index, timesteps[index], x_t, denoised)

            def denoise_next(x_next, _index=index):
                return self.denoise_sigma(model_fn, x_next, _index + 1, cond)

            x = self.sigma_step(index, x, denoised, previous, denoise_next, generator)
            previous = denoised
        if last_step < self.num_steps:  # stopped part-way: back to DDPM space at that noise level
            x = x / cast_like((1 + self._sigmas[last_step] ** 2).sqrt(), x)
        return x


@register_sampler("euler_a")
class EulerAncestralSampler(KarrasSampler):
    """Euler ancestral sampler (k-diffusion ``sample_euler_ancestral``), one model evaluation per step.

    ``eta = 1`` (default) adds the DDPM posterior noise: with ``sigma_spacing="uniform"`` it is step for step DDIM
    eta = 1 on the ``trailing`` timesteps ending at ``abar = 1``. ``eta = 0`` is the deterministic Euler method.
    Other arguments: :class:`KarrasSampler`.
    """

    def __init__(self, schedule, num_steps: int = 25, eta: float = 1.0, **kwargs):
        super().__init__(schedule, num_steps=num_steps, **kwargs)
        self.eta = _check_eta(eta)

    def sigma_step(self, index, x, denoised, previous_denoised, denoise_next, generator):
        sigma, sigma_next = self._sigmas[index], self._sigmas[index + 1]
        _, sigma_up = get_ancestral_step(sigma, sigma_next, self.eta)
        noise = gaussian.randn_like(x, generator) if sigma_up > 0 else None
        return euler_ancestral_step(x, denoised, sigma, sigma_next, self.eta, noise)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", eta={self.eta})"


@register_sampler("heun")
class HeunSampler(KarrasSampler):
    """Heun's 2nd-order method (Karras et al. 2022 Algorithm 1, ``S_churn = 0``): deterministic, two model
    evaluations per step except the last (to ``sigma = 0``), which is an Euler step: ``2 n - 1`` in all.
    Arguments: :class:`KarrasSampler`.

    Step ratios: the corrected point is ``x_euler + (r - 1) / 2 (D(x_euler, sigma_next) - D(x, sigma))`` with
    ``r = sigma / sigma_next``, so a change of the denoiser's prediction over the step is amplified by
    ``(r - 1) / 2``. Heun wants ``r`` near 1 (EDM's grid, sigma_max 80 and 18 steps: 1.4 to 3.8). A schedule with
    zero-like terminal SNR has sigma_max ~ 2e4: the Karras grid of 10 steps then has ratios 2 to 69, and with
    guidance scale 5 the shapes demo's latents blow up (std 6 instead of 0.9). Use more steps or another sampler.
    """

    @property
    def num_model_evaluations(self) -> int:
        return 2 * self.num_steps - 1

    def sigma_step(self, index, x, denoised, previous_denoised, denoise_next, generator):
        sigma, sigma_next = self._sigmas[index], self._sigmas[index + 1]
        x_euler = euler_step(x, denoised, sigma, sigma_next)
        if sigma_next == 0:
            return x_euler
        return heun_step(x, denoised, x_euler, denoise_next(x_euler), sigma, sigma_next)


# -- argument checks ---------------------------------------------------------------------------------------------------


def _check_num_steps(num_steps, num_timesteps: Optional[int] = None) -> int:
    upper = math.inf if num_timesteps is None else num_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= upper:
        allowed = "an integer >= 1"
        if num_timesteps is not None:
            allowed = f"an integer in 1..{num_timesteps} (the training timesteps)"
        raise ValueError(f"num_steps must be {allowed}, got {num_steps!r}")
    return num_steps


def _check_rho(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, Real) or not 0 < rho < math.inf:
        raise ValueError(f"rho must be a positive number, got {rho!r}")
    return float(rho)


def _check_sigma(name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if not lo * (1 - _SIGMA_RANGE_RTOL) <= value <= hi * (1 + _SIGMA_RANGE_RTOL):
        raise ValueError(
            f"{name}={value} lies outside the schedule's noise levels [{lo:.6g}, {hi:.6g}] (no timestep matches it)"
        )
    return min(max(value, lo), hi)
