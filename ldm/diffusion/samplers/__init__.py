"""Samplers sharing one call signature (see :class:`Sampler`); pick one by name with :func:`build_sampler`."""

from .base import TIMESTEP_SPACINGS, Sampler, make_timesteps
from .ddim import DDIMSampler, ddim_sigma, ddim_step
from .ddpm import DDPM_VARIANCES, DDPMSampler, ddpm_step, ddpm_step_variance
from .dpm_solver import DPMSolverPP2MSampler, dpmpp_2m_step
from .karras import (
    SIGMA_SPACINGS,
    EulerAncestralSampler,
    HeunSampler,
    KarrasSampler,
    euler_ancestral_step,
    euler_step,
    get_ancestral_step,
    heun_step,
    karras_sigmas,
    sigma_to_alpha_cumprod,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    t_to_sigma,
    to_d,
)
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
    "KarrasSampler",
    "SIGMA_SPACINGS",
    "EulerAncestralSampler",
    "HeunSampler",
    "DPMSolverPP2MSampler",
    "karras_sigmas",
    "sigmas_from_alphas_cumprod",
    "sigma_to_alpha_cumprod",
    "sigma_to_t",
    "t_to_sigma",
    "to_d",
    "get_ancestral_step",
    "euler_step",
    "euler_ancestral_step",
    "heun_step",
    "dpmpp_2m_step",
    "SAMPLERS",
    "available_samplers",
    "build_sampler",
    "register_sampler",
]
