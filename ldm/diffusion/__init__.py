"""DDPM / DDIM diffusion core: schedules, forward-process math, training loss, variational bound, samplers.

Timesteps are 0-based DDPM indices ``t = 0 .. T-1``; ``abar_t = alphas_cumprod[t]``.

Two layers with the same math:

* pure functions over explicit coefficients (:mod:`ldm.diffusion.gaussian`, k-diffusion style), coefficient last:
  ``q_sample(x0, noise, alpha_cumprod)``, ``predict_x0_from_eps(x_t, eps, alpha_cumprod)``, ...;
* :class:`NoiseSchedule` methods indexed by integer timesteps (CompVis argument order):
  ``schedule.q_sample(x0, t, noise)``, ``schedule.predict_x0_from_eps(x_t, t, eps)``, ``schedule.get_v(x0, noise, t)``.

Samplers share ``sampler.sample(model_fn, x_T, cond=None, generator=None, progress=True, callback=None)`` with
``model_fn(x_t, t, cond)``; :func:`build_sampler` picks one by name.
"""

from .gaussian import (
    PARAMETERIZATIONS,
    discretized_gaussian_log_likelihood,
    gaussian_log_prob,
    matched_filter_snr,
    get_v,
    model_output_to_x0_eps,
    normal_kl,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_posterior_mean_variance,
    q_sample,
    randn_like,
    training_target,
)
from .guidance import cat_batch, classifier_free_guidance
from .losses import diffusion_loss, high_noise_timestep_density, min_snr_weight, sample_timesteps
from .noise_schedule import ZERO_TERMINAL_SNR_ALPHA_CUMPROD, NoiseSchedule, terminal_alpha_cumprod
from .samplers import (
    SAMPLERS,
    TIMESTEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    HeunSampler,
    KarrasSampler,
    SIGMA_SPACINGS,
    Sampler,
    available_samplers,
    build_sampler,
    ddim_sigma,
    ddim_step,
    ddpm_step,
    ddpm_step_variance,
    dpmpp_2m_step,
    euler_ancestral_step,
    euler_step,
    get_ancestral_step,
    heun_step,
    karras_sigmas,
    make_timesteps,
    register_sampler,
    sigma_to_t,
    t_to_sigma,
)
from .schedules import BETA_SCHEDULES, cosine_betas, linear_betas, make_beta_schedule, rescale_zero_terminal_snr
from .schedules import scaled_linear_betas
from .vlb import VariationalBound, nats_to_bits_per_dim, prior_kl, variational_bound

__all__ = [
    "BETA_SCHEDULES",
    "make_beta_schedule",
    "linear_betas",
    "scaled_linear_betas",
    "cosine_betas",
    "rescale_zero_terminal_snr",
    "NoiseSchedule",
    "ZERO_TERMINAL_SNR_ALPHA_CUMPROD",
    "terminal_alpha_cumprod",
    "PARAMETERIZATIONS",
    "q_sample",
    "q_posterior_mean_variance",
    "predict_x0_from_eps",
    "predict_eps_from_x0",
    "predict_x0_from_v",
    "predict_eps_from_v",
    "get_v",
    "model_output_to_x0_eps",
    "training_target",
    "normal_kl",
    "gaussian_log_prob",
    "matched_filter_snr",
    "discretized_gaussian_log_likelihood",
    "randn_like",
    "diffusion_loss",
    "min_snr_weight",
    "high_noise_timestep_density",
    "sample_timesteps",
    "VariationalBound",
    "variational_bound",
    "prior_kl",
    "nats_to_bits_per_dim",
    "Sampler",
    "DDPMSampler",
    "DDIMSampler",
    "ddpm_step",
    "ddpm_step_variance",
    "ddim_step",
    "ddim_sigma",
    "make_timesteps",
    "TIMESTEP_SPACINGS",
    "SAMPLERS",
    "available_samplers",
    "build_sampler",
    "register_sampler",
    "KarrasSampler",
    "SIGMA_SPACINGS",
    "EulerAncestralSampler",
    "HeunSampler",
    "DPMSolverPP2MSampler",
    "karras_sigmas",
    "sigma_to_t",
    "t_to_sigma",
    "get_ancestral_step",
    "euler_step",
    "euler_ancestral_step",
    "heun_step",
    "dpmpp_2m_step",
    "classifier_free_guidance",
    "cat_batch",
]
