"""Samplers sharing one call signature (see :class:`Sampler`); pick one by name with :func:`build_sampler`."""

from .base import TIMESTEP_SPACINGS, Sampler, make_timesteps
from .ddim import DDIMSampler, ddim_sigma, ddim_step
from .ddpm import DDPM_VARIANCES, DDPMSampler, ddpm_step, ddpm_step_variance
from .registry import SAMPLERS, available_samplers, build_sampler, register_sampler

__all__ = [
    "Sampler",
    "make_timesteps",
    "TIMESTEP_SPACINGS",
    "DDIMSampler",
    "ddim_step",
    "ddim_sigma",
    "DDPMSampler",
    "ddpm_step",
    "ddpm_step_variance",
    "DDPM_VARIANCES",
    "SAMPLERS",
    "available_samplers",
    "build_sampler",
    "register_sampler",
]
