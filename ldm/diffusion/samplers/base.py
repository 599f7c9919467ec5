"""The shared sampler interface and the choice of timestep sub-sequences.

Every sampler is built as ``Sampler(schedule, num_steps=..., parameterization=..., clip_denoised=..., ...)`` and
used as ``sampler.sample(model_fn, x_T, cond=None, generator=None, progress=True, callback=None) -> x_0``, so one
config line swaps samplers. See :class:`Sampler`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import gaussian
from ..gaussian import check_parameterization
from ..guidance import (
    check_guidance_interval,
    check_guidance_rescale,
    in_guidance_interval,
    sigma_from_alpha_cumprod,
    with_guidance_options,
)

logger = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], Any]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 1
) -> torch.Tensor:
    """Descending int64 ``[num_steps]`` sub-sequence of the DDPM timesteps ``0 .. T-1`` to sample on.

    * ``leading`` (Stable Diffusion / CompVis ``make_ddim_timesteps(ddim_discr_method='uniform')``):
      ``c = T // n``, ``t_i = i c + steps_offset`` for ``i = 0 .. n-1``. With ``T = 1000, n = 50`` and the default
      offset 1: 981, 961, ..., 1. (CompVis uses ``range(0, T, c)``, which has ``n + 1`` entries when ``n`` does not
      divide ``T``; here there are always exactly ``n``, as in diffusers.)
    * ``trailing`` (Lin et al. 2024; needed for zero terminal SNR, it starts at ``T-1``):
      ``t_i = round(T - i T/n) - 1``; 999, 979, ..., 19 for 50 of 1000.
    * ``linspace``: ``round(linspace(0, T-1, n))``, both ends included.

    ``steps_offset`` applies to ``leading`` only. ``leading`` with ``steps_offset=1`` and ``n = T`` would reach
    ``t = T``: that is a ``ValueError`` (use ``trailing`` or ``steps_offset=0``).
    """
    T = num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an integer in 1..{T} (the training timesteps), got {num_steps!r}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
    n = num_steps
    if spacing == "leading":
        ascending = torch.arange(n, dtype=torch.int64) * (T // n) + steps_offset
        timesteps = ascending.flip(0)
    elif spacing == "trailing":
        timesteps = (T - torch.arange(n, dtype=torch.float64) * (T / n)).round().to(torch.int64) - 1
    else:
        timesteps = torch.linspace(0, T - 1, n, dtype=torch.float64).round().to(torch.int64).flip(0)
    if int(timesteps.max()) >= T or int(timesteps.min()) < 0:
        raise ValueError(
            f"{spacing} spacing with {n} steps and steps_offset={steps_offset} gives timesteps outside 0..{T - 1} "
            f"(max {int(timesteps.max())}); use timestep_spacing='trailing' or steps_offset=0"
        )
    if n > 1 and not bool((timesteps[:-1] > timesteps[1:]).all()):
        raise ValueError(f"{spacing} spacing with {n} of {T} steps does not give distinct timesteps")
    return timesteps


class Sampler:
    """Base class: iterates ``x_T -> x_0`` over descending ``timesteps`` with one model call per step.

    Shared constructor arguments:
        schedule: a :class:`ldm.diffusion.NoiseSchedule` (float64 tables).
        num_steps: number of denoising steps (each one model evaluation).
        parameterization: what ``model_fn`` predicts: ``eps`` (default), ``x0`` or ``v``.
        clip_denoised: when set to ``c``, clamp the predicted x0 to ``[-c, c]`` (and re-derive eps from it).
        guidance_rescale: ``phi`` in ``[0, 1]`` (default 0, off): rescale the classifier-free-guided output's std to
            the conditional output's, Lin et al. 2023 eq. 15-16 (:func:`ldm.diffusion.guidance.rescale_guidance`).
        guidance_interval: ``[sigma_lo, sigma_hi]`` (default None, everywhere): guide only the steps whose noise
            level ``sigma = sqrt((1 - abar_t) / abar_t)`` lies in ``(sigma_lo, sigma_hi]`` (Kynkäänniemi et al.
            2024); the other steps use the conditional output alone, one network pass on ``B`` rows. In sigma, not
            timesteps, so one band means the same noise levels for every schedule, step count and sampler
            (:attr:`step_sigmas` lists a sampler's levels). A band holding none of them is a ``ValueError``.

    The two guidance options act on a ``model_fn`` made by :func:`ldm.diffusion.classifier_free_guidance` (what
    ``LatentDiffusion.sample`` passes for a guidance scale other than 1) and leave an unguided one as it is.

    Shared call::

        x0 = sampler.sample(model_fn, x_T, cond=None, generator=None, progress=True, callback=None, first_step=0,
                            guide=None, last_step=None)

    * ``first_step``: start part-way (``x_T`` is then the state entering that step, see :meth:`input_alpha_cumprod`).
    * ``guide(index, x_t) -> x_t``: optional, changes the state entering each step (inpainting's known region).
    * ``last_step``: stop before that step, returning the state entering it (DDPM space).
    * ``model_fn(x_t [B, ...], t [B] int64 DDPM timesteps in 0..T-1, cond) -> output [B, ...]``;
      ``cond`` is passed through unchanged (wrap ``model_fn`` with
      :func:`ldm.diffusion.classifier_free_guidance` for guidance).
    * ``generator``: optional ``torch.Generator`` used for all noise the sampler draws, or one per row of ``x_T``.
    * ``progress``: show a tqdm bar.
    * ``callback(step_index, t, x_t, pred_x0)`` after each step, with the step's input ``x_t`` and the x0 predicted
      from it (k-diffusion's convention).

    Arithmetic is done in the dtype of ``x_T``; coefficients are formed in float64 from the schedule's tables and
    cast once. Subclasses take ``num_steps``, set ``self._timesteps`` and implement :meth:`step`; multi-evaluation samplers override
    :meth:`sample` and :attr:`num_model_evaluations`.
    """

    name: Optional[str] = None  # set by @register_sampler

    def __init__(
        self,
        schedule,
        parameterization: str = "eps",
        clip_denoised: Optional[float] = None,
        guidance_rescale: float = 0.0,
        guidance_interval: Optional[Tuple[float, float]] = None,
    ):
        if not hasattr(schedule, "alphas_cumprod") or not hasattr(schedule, "num_timesteps"):
            raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        check_parameterization(parameterization)
        if clip_denoised is not None and (
            isinstance(clip_denoised, bool) or not isinstance(clip_denoised, (int, float)) or not clip_denoised > 0
        ):
            raise ValueError(f"clip_denoised must be None or a positive number, got {clip_denoised!r}")
        self.schedule = schedule
        self.parameterization = parameterization
        self.clip_denoised = None if clip_denoised is None else float(clip_denoised)
        self.guidance_rescale = check_guidance_rescale(guidance_rescale)
        self.guidance_interval = check_guidance_interval(guidance_interval)
        self._alphas_cumprod = schedule.alphas_cumprod.detach().to("cpu", torch.float64)
        self._timesteps = torch.arange(schedule.num_timesteps - 1, -1, -1, dtype=torch.int64)
        if getattr(schedule, "rescale_zero_terminal_snr", False) and parameterization == "eps":
            logger.warning(
                "zero-terminal-SNR schedule with an eps-prediction model: x0 = (x_t - sqrt(1-abar) eps)/sqrt(abar) "
                "is ill-conditioned at the last timestep (abar ~ %.2e); prefer parameterization='v'",
                float(self._alphas_cumprod[-1]),
            )

    # -- description -------------------------------------------------------------------------------------------------

    @property
    def timesteps(self) -> torch.Tensor:
        """DDPM timesteps visited, descending int64 ``[num_steps]`` (a copy)."""
        return self._timesteps.clone()

    @property
    def num_steps(self) -> int:
        return int(self._timesteps.shape[0])

    @property
    def num_model_evaluations(self) -> int:
        """``model_fn`` calls per :meth:`sample` (a guided ``model_fn`` batches cond and uncond in one call)."""
        return self.num_steps

    @property
    def step_sigmas(self) -> torch.Tensor:
        """Float64 noise levels ``sigma = sqrt((1 - abar_t) / abar_t)`` of the steps' model evaluations
        ``[num_steps]``, the levels a ``guidance_interval`` is compared with."""
        return sigma_from_alpha_cumprod(self._alphas_cumprod[self._timesteps])

    @property
    def guided_steps(self) -> int:
        """How many steps of a full run fall in ``guidance_interval`` (all of them without one): these evaluate
        the network on ``2B`` rows with guidance, the others on ``B``."""
        return int(in_guidance_interval(self.step_sigmas, self.guidance_interval).sum())

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """Float64 noise level of DDPM timesteps ``t`` (any shape; integer, or fractional as the Karras grids give:
        ``log sigma`` interpolated between the neighbouring timesteps, :func:`~ldm.diffusion.samplers.karras.t_to_sigma`)."""
        from .karras import t_to_sigma  # karras imports this module

        t = torch.as_tensor(t).detach().to("cpu")
        table = sigma_from_alpha_cumprod(self._alphas_cumprod)
        if not t.is_floating_point() or bool((t == t.round()).all()):
            return table[t.round().long()]  # exact, also where sigma is inf (zero terminal SNR)
        return t_to_sigma(t, table.log())

    def _check_guidance_interval_grid(self) -> None:
        """A ``ValueError`` when ``guidance_interval`` holds none of this sampler's noise levels (guidance would never
        act: most likely timesteps were given where noise levels are meant). Called once the grid is known."""
        if self.guidance_interval is not None and self.guided_steps == 0:
            sigmas = self.step_sigmas
            lo, hi = self.guidance_interval
            raise ValueError(
                f"guidance_interval ({lo:g}, {hi:g}] holds none of the {self.num_steps} noise levels of this "
                f"{type(self).__name__} (sigma from {float(sigmas.max()):.4g} down to {float(sigmas.min()):.4g}); "
                f"it is in sigma = sqrt((1 - abar_t) / abar_t), not in timesteps"
            )

    def guided_model_fn(self, model_fn: ModelFn) -> ModelFn:
        """``model_fn`` with this sampler's ``guidance_rescale`` / ``guidance_interval``
        (:func:`ldm.diffusion.guidance.with_guidance_options`); :meth:`sample` calls it first."""
        return with_guidance_options(model_fn, self.guidance_rescale, self.guidance_interval, self.sigma_at)

    def __repr__(self) -> str:
        guidance = ""
        if self.guidance_rescale:
            guidance += f", guidance_rescale={self.guidance_rescale}"
        if self.guidance_interval is not None:
            guidance += f", guidance_interval={list(self.guidance_interval)}"
        return (
            f"{type(self).__name__}(num_steps={self.num_steps}, parameterization={self.parameterization!r}, "
            f"clip_denoised={self.clip_denoised}{guidance})"
        )

    # -- one model evaluation ----------------------------------------------------------------------------------------

    def alpha_cumprod(self, t: int) -> torch.Tensor:
        """Float64 0-d ``abar_t``."""
        return self._alphas_cumprod[t]

    def input_alpha_cumprod(self, index: int) -> torch.Tensor:
        """Float64 0-d ``abar`` of the state entering step ``index``: ``sample(..., first_step=index)`` takes
        ``x = sqrt(abar) x0 + sqrt(1 - abar) noise`` (how img2img starts part-way, SDEdit)."""
        return self.alpha_cumprod(int(self._timesteps[index]))

    def check_last_step(self, first_step: int, last_step: Optional[int]) -> int:
        last_step = self.num_steps if last_step is None else int(last_step)
        if not first_step < last_step <= self.num_steps:
            raise ValueError(f"last_step must be in {first_step + 1}..{self.num_steps}, got {last_step}")
        return last_step

    def check_first_step(self, first_step: int) -> int:
        if not 0 <= int(first_step) < self.num_steps:
            raise ValueError(f"first_step must be in 0..{self.num_steps - 1}, got {first_step}")
        return int(first_step)

    def denoise(
        self, model_fn: ModelFn, x_t: torch.Tensor, t: int, cond: Any = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One model call at timestep ``t``: returns ``(pred_x0, pred_eps)``, both ``[B, ...]``.

        With ``clip_denoised = c`` the x0 prediction is clamped to ``[-c, c]`` and eps re-derived from it, so both
        stay consistent with ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` (as guided-diffusion's DDIM).
        """
        t_batch = torch.full((x_t.shape[0],), int(t), dtype=torch.int64, device=x_t.device)
        output = model_fn(x_t, t_batch, cond)
        if not isinstance(output, torch.Tensor) or output.shape != x_t.shape:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"model_fn returned {shape}; expected a tensor of the shape of x_t {tuple(x_t.shape)}")
        abar = self.alpha_cumprod(t)
        pred_x0, pred_eps = gaussian.model_output_to_x0_eps(output, x_t, abar, self.parameterization)
        if self.clip_denoised is not None:
            pred_x0 = pred_x0.clamp(-self.clip_denoised, self.clip_denoised)
            pred_eps = gaussian.predict_eps_from_x0(x_t, pred_x0, abar)
        return pred_x0, pred_eps

    def step(
        self,
        index: int,
        x_t: torch.Tensor,
        pred_x0: torch.Tensor,
        pred_eps: torch.Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """``x_t`` at ``timesteps[index]`` -> the next (less noisy) state."""
        raise NotImplementedError

    # -- the loop ----------------------------------------------------------------------------------------------------

    @staticmethod
    def check_x_T(x_T: torch.Tensor) -> None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise ValueError("x_T must be a floating-point tensor [B, ...]")
        if x_T.ndim < 1 or x_T.shape[0] == 0:
            raise ValueError(f"x_T must be a non-empty batch [B, ...], got shape {tuple(x_T.shape)}")

    def sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        cond: Any = None,
        generator: Optional[torch.Generator] = None,
        progress: bool = True,
        callback: Optional[Callback] = None,
        first_step: int = 0,
        guide: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
        last_step: Optional[int] = None,
    ) -> torch.Tensor:
        """Run the reverse process from ``x_T`` (standard normal noise at the first timestep) to ``x_0``.

        ``first_step > 0`` skips the first steps: ``x_T`` is then the state entering that step
        (:meth:`input_alpha_cumprod`), as img2img starts from a noised image. ``guide(index, x_t) -> x_t`` may
        change the state entering each step (DDPM space), as inpainting puts the known region back. ``last_step``:
        stop before that step and return the state entering it (DDPM space; RePaint's resampling steps one at a
        time)."""
        self.check_x_T(x_T)
        first_step = self.check_first_step(first_step)
        last_step = self.check_last_step(first_step, last_step)
        model_fn = self.guided_model_fn(model_fn)
        x = x_T
        timesteps = self._timesteps.tolist()
        steps = list(enumerate(timesteps))[first_step:last_step]
        for index, t in tqdm(steps, desc=type(self).__name__, disable=not progress, leave=False):
            if guide is not None:
                x = guide(index, x)
            pred_x0, pred_eps = self.denoise(model_fn, x, t, cond)
            x_prev = self.step(index, x, pred_x0, pred_eps, generator)
            if callback is not None:
                callback(index, t, x, pred_x0)
            x = x_prev
        return x
