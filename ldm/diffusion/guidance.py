"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around ``model_fn``, with two options that trade
guidance's prompt adherence against its loss of diversity.

``out = out_u + s (out_c - out_u)``: ``s = 1`` is the conditional model, ``s = 0`` the unconditional one, ``s > 1``
extrapolates away from the unconditional prediction. Applied to the raw model output (eps, x0 or v alike, as
Stable Diffusion 1.x / 2.x and diffusers do).

Options (every sampler takes them as ``guidance_rescale`` / ``guidance_interval``, see
:class:`ldm.diffusion.samplers.base.Sampler`):

* **rescale** ``phi`` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16):
  the guided output's per-sample std is brought back to the conditional output's, blended with weight ``phi``
  (:func:`rescale_guidance`). Large scales inflate the output's std (over-exposed, over-saturated images).
* **interval** ``(sigma_lo, sigma_hi]`` (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval
  Improves Sample and Distribution Quality"): guidance only where the noise level ``sigma = sqrt((1 - abar_t) /
  abar_t)`` lies in the band; elsewhere the plain conditional output, which needs one network pass on ``B`` rows
  instead of ``2B`` (:func:`in_guidance_interval`). Guidance at the highest noise levels is what collapses the
  layouts to a few modes.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Callable, Mapping, Optional, Tuple

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
SigmaFn = Callable[[torch.Tensor], torch.Tensor]


def cat_batch(first: Any, second: Any) -> Any:
    """Concatenate two conditionings along the batch dim: tensors, or dicts / lists / tuples of them (nested).

    Raises ``ValueError`` when the two do not have the same structure or the tensors do not concatenate.
    """
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        if first.shape[1:] != second.shape[1:]:
            raise ValueError(
                f"cond and uncond shapes do not concatenate along the batch: {tuple(first.shape)} vs "
                f"{tuple(second.shape)}"
            )
        return torch.cat([first, second], dim=0)
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        if set(first) != set(second):
            raise ValueError(f"cond and uncond have different keys: {sorted(first)} vs {sorted(second)}")
        return {key: cat_batch(first[key], second[key]) for key in first}
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        if len(first) != len(second):
            raise ValueError(f"cond and uncond lists differ in length: {len(first)} vs {len(second)}")
        return type(first)(cat_batch(a, b) for a, b in zip(first, second))
    raise ValueError(
        f"cannot batch cond of type {type(first).__name__} with uncond of type {type(second).__name__}"
    )


# -- the math ------------------------------------------------------------------------------------------------------


def guided_output(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """``out_u + s (out_c - out_u)`` (Ho & Salimans 2022, eq. 6 written on the model output)."""
    return out_uncond + scale * (out_cond - out_uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale, Lin et al. (2023) eq. 15-16, per sample (std over every dim but the batch)::

        sigma_pos = std(x_pos),   sigma_cfg = std(x_cfg)
        x_rescaled = x_cfg * sigma_pos / sigma_cfg                          (15)
        x_final = phi * x_rescaled + (1 - phi) * x_cfg                      (16)

    ``x_cfg = guided``, ``x_pos = cond`` (the conditional output), both ``[B, ...]``; ``phi`` in ``[0, 1]``
    (``0``: plain guidance). A sample whose guided output is constant (std 0) is left as it is. The stds are taken
    in at least float32, so a bf16 / fp16 output (autocast) is not rescaled by a rounded ratio.
    """
    phi = check_guidance_rescale(phi)
    if guided.shape != cond.shape:
        raise ValueError(f"rescale_guidance: guided {tuple(guided.shape)} and cond {tuple(cond.shape)} differ")
    if guided.ndim < 2:
        raise ValueError(f"rescale_guidance needs a batch [B, ...] with at least one more dim, got {tuple(guided.shape)}")
    dims = list(range(1, guided.ndim))
    work = torch.promote_types(guided.dtype, torch.float32)
    std_cond = cond.to(work).std(dim=dims, keepdim=True)
    std_cfg = guided.to(work).std(dim=dims, keepdim=True)
    ratio = torch.where(std_cfg > 0, std_cond / std_cfg, torch.ones_like(std_cfg))
    rescaled = guided.to(work) * ratio
    return (phi * rescaled + (1 - phi) * guided.to(work)).to(guided.dtype)


def in_guidance_interval(sigma: torch.Tensor, interval: Optional[Tuple[float, float]]) -> torch.Tensor:
    """Bool, shape of ``sigma``: ``sigma_lo < sigma <= sigma_hi`` (Kynkäänniemi et al. 2024, eq. 4: the guidance
    weight is ``w`` inside the half-open band and ``1`` outside). ``interval=None`` is everywhere."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if interval is None:
        return torch.ones_like(sigma, dtype=torch.bool)
    lo, hi = check_guidance_interval(interval)
    return (sigma > lo) & (sigma <= hi)


def sigma_from_alpha_cumprod(alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """``sigma = sqrt((1 - abar) / abar)``, the noise level of ``x_t / sqrt(abar)`` (float64; ``abar = 0`` gives
    ``inf``)."""
    a = torch.as_tensor(alpha_cumprod, dtype=torch.float64)
    return ((1 - a) / a).sqrt()


# -- checks --------------------------------------------------------------------------------------------------------


def check_guidance_rescale(phi: Any) -> float:
    """``phi`` as a float in ``[0, 1]``; a ``ValueError`` naming ``guidance_rescale`` otherwise."""
    if isinstance(phi, bool) or not isinstance(phi, Real) or not 0.0 <= float(phi) <= 1.0:
        raise ValueError(f"guidance_rescale (--guidance-rescale) must be a number in [0, 1], got {phi!r}")
    return float(phi)


def check_guidance_interval(interval: Any) -> Optional[Tuple[float, float]]:
    """``None`` or ``(sigma_lo, sigma_hi)`` with ``0 <= sigma_lo < sigma_hi`` (``sigma_hi`` may be ``inf``), as
    floats; a ``ValueError`` naming ``guidance_interval`` otherwise."""
    if interval is None:
        return None
    what = "guidance_interval (--guidance-interval SIGMA_LO SIGMA_HI)"
    if isinstance(interval, (str, bytes)) or not hasattr(interval, "__len__") or len(interval) != 2:
        raise ValueError(f"{what} must be two noise levels [sigma_lo, sigma_hi], got {interval!r}")
    values = list(interval)
    if any(isinstance(v, bool) or not isinstance(v, Real) or math.isnan(v) for v in values):
        raise ValueError(f"{what} must be two numbers, got {interval!r}")
    lo, hi = float(values[0]), float(values[1])
    if not (0.0 <= lo < hi) or math.isinf(lo):
        raise ValueError(
            f"{what} must satisfy 0 <= sigma_lo < sigma_hi (sigma = sqrt((1 - abar_t) / abar_t), not a timestep; "
            f"sigma_hi may be inf), got [{lo:g}, {hi:g}]"
        )
    return lo, hi


# -- the wrapper ---------------------------------------------------------------------------------------------------


def classifier_free_guidance(
    model_fn: ModelFn,
    guidance_scale: Optional[float],
    rescale: float = 0.0,
    interval: Optional[Tuple[float, float]] = None,
    sigma_of_t: Optional[SigmaFn] = None,
) -> ModelFn:
    """Wrap ``model_fn(x, t, cond)`` into ``guided_fn(x, t, (cond, uncond))``.

    ``guided_fn`` makes ONE ``model_fn`` call on the batch of ``2B``: ``x`` and ``t`` repeated and
    ``[uncond; cond]`` concatenated along dim 0 (see :func:`cat_batch`), then returns
    ``out_u + s (out_c - out_u)`` ``[B, ...]``. It always batches, also at ``s = 1`` or ``s = 0`` (results equal the
    conditional / unconditional model up to rounding).

    ``rescale`` (``phi`` in [0, 1]): :func:`rescale_guidance` of the guided output. ``interval``
    (``(sigma_lo, sigma_hi]``, needs ``sigma_of_t``, mapping the ``t [B]`` given to ``guided_fn`` to float64 noise
    levels ``[B]``): where no row's ``sigma`` is in the band, ONE ``model_fn`` call on the ``B`` conditional rows
    and its output returned as it is; rows in the band are guided (a batch mixing both is evaluated on ``2B`` rows).

    ``guidance_scale=None`` means no guidance: ``model_fn`` itself is returned and ``cond`` is passed unchanged.
    """
    if guidance_scale is None:
        return model_fn
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a number or None, got {guidance_scale!r}")
    scale = float(guidance_scale)
    rescale = check_guidance_rescale(rescale)
    interval = check_guidance_interval(interval)
    if interval is not None and sigma_of_t is None:
        raise ValueError("a guidance interval needs sigma_of_t (timestep -> noise level) to place t in the band")

    def guided_fn(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if not isinstance(cond, (tuple, list)) or len(cond) != 2:
            raise ValueError("a classifier-free-guided model_fn takes cond as a pair (cond, uncond)")
        c, uc = cond
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        inside = None
        if interval is not None:
            inside = in_guidance_interval(sigma_of_t(t), interval).to(x.device)
            if not bool(inside.any()):
                return model_fn(x, t, c)  # outside the band: weight 1, the conditional output, B rows only
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), cat_batch(uc, c))
        if not isinstance(out, torch.Tensor) or out.shape[0] != 2 * batch:
            raise ValueError(f"guided model_fn expected an output batch of {2 * batch}")
        out_u, out_c = out.chunk(2)
        guided = guided_output(out_u, out_c, scale)
        if rescale > 0:
            guided = rescale_guidance(guided, out_c, rescale)
        if inside is not None and not bool(inside.all()):
            guided = torch.where(inside.view(-1, *([1] * (guided.ndim - 1))), guided, out_c)
        return guided

    guided_fn.guidance_scale = scale
    guided_fn.model_fn = model_fn
    guided_fn.guidance_rescale = rescale
    guided_fn.guidance_interval = interval
    return guided_fn


def with_guidance_options(
    model_fn: ModelFn, rescale: float = 0.0, interval: Optional[Tuple[float, float]] = None,
    sigma_of_t: Optional[SigmaFn] = None,
) -> ModelFn:
    """``model_fn`` with a sampler's guidance options applied (what :meth:`Sampler.sample` does first).

    A ``model_fn`` made by :func:`classifier_free_guidance` is rebuilt around the same inner function and scale with
    ``rescale`` / ``interval``. Any other ``model_fn`` is returned unchanged: it is not guided (e.g.
    ``LatentDiffusion.sample`` at guidance 1), and for an unguided model both options are the identity (the guided
    output already is the conditional one). Options given both to the sampler and to ``classifier_free_guidance``
    are a ``ValueError``.
    """
    rescale = check_guidance_rescale(rescale)
    interval = check_guidance_interval(interval)
    if rescale == 0.0 and interval is None:
        return model_fn
    if not (hasattr(model_fn, "guidance_scale") and hasattr(model_fn, "model_fn")):
        return model_fn
    if getattr(model_fn, "guidance_rescale", 0.0) or getattr(model_fn, "guidance_interval", None) is not None:
        raise ValueError("guidance options were given twice: to classifier_free_guidance and to the sampler")
    return classifier_free_guidance(model_fn.model_fn, model_fn.guidance_scale, rescale, interval, sigma_of_t)
