"""Closed-form reference for samplers on Gaussian data x0 ~ N(m, s^2), shared by the sampler tests.

For that data every conditional is Gaussian: with ``V = abar s^2 + 1 - abar`` and ``d = x_t - sqrt(abar) m``,
``E[eps | x_t] = sqrt(1 - abar) d / V`` and ``E[x0 | x_t] = m + sqrt(abar) s^2 d / V``; :func:`optimal_model` is that
model. Each sampler step is then an affine map of ``x_t`` plus Gaussian noise, so the exact moments of a discrete
chain follow from a scalar recursion (:func:`exact_chain_moments`), written from the papers' equations.
"""

import math

import torch


def _coefficient_tables(a, s):
    V = a * s**2 + 1 - a
    return {
        "sqrt_a": a.sqrt(),
        "sqrt_1ma": (1 - a).sqrt(),
        "eps_coef": (1 - a).sqrt() / V,  # E[eps | x_t] = sqrt(1 - abar) d / V
        "x0_coef": a.sqrt() * s**2 / V,  # E[x0 | x_t] = m + sqrt(abar) s^2 d / V
    }


def interpolated_alpha_cumprod(schedule, t):
    """abar at fractional timesteps t: log sigma_t = 0.5 log((1 - abar_t) / abar_t) interpolated linearly between
    floor(t) and ceil(t) (k-diffusion DiscreteSchedule.t_to_sigma), then abar = 1 / (1 + sigma^2)."""
    a = schedule.alphas_cumprod
    log_sigma_table = 0.5 * (torch.log1p(-a) - torch.log(a))
    t = torch.as_tensor(t, dtype=torch.float64)
    lo, hi = t.floor().long(), t.ceil().long()
    w = t - lo
    log_sigma = (1 - w) * log_sigma_table[lo] + w * log_sigma_table[hi]
    return torch.sigmoid(-2 * log_sigma)


def optimal_model(schedule, m, s, parameterization="eps"):
    """model_fn(x_t, t, cond) predicting E[eps | x_t], E[x0 | x_t] or the v of those, for x0 ~ N(m, s^2).

    Integer t index the schedule; fractional (float) t are at the noise level of interpolated_alpha_cumprod.
    """
    # per-timestep coefficient tables, gathered per sample (vector sqrt/exp are slow on contended cores)
    tables = _coefficient_tables(schedule.alphas_cumprod, s)

    def model_fn(x, t, cond):
        if t.dtype.is_floating_point:
            coefs = _coefficient_tables(interpolated_alpha_cumprod(schedule, t), s)
        else:
            coefs = {k: v[t] for k, v in tables.items()}
        c = {k: v.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) for k, v in coefs.items()}
        d = x - c["sqrt_a"] * m
        eps = c["eps_coef"] * d
        x0 = m + c["x0_coef"] * d
        if parameterization == "eps":
            return eps
        if parameterization == "x0":
            return x0
        return c["sqrt_a"] * eps - c["sqrt_1ma"] * x0

    return model_fn


def exact_chain_moments(abar_t, abar_prev, step_var, kind, m, s, mean0, var0):
    """Mean/variance after the chain, from the affine recursion x_prev = A x + B + sigma z (float64 scalars).

    kind 'ddim': x_prev = sqrt(ap) x0hat + sqrt(1 - ap - sigma^2) epshat + sigma z (DDIM eq. 12);
    kind 'ddpm': x_prev = c1 x0hat + c2 x + sigma z with the posterior coefficients of beta = 1 - a / ap.
    """
    mean, var = mean0, var0
    for a, ap, sig2 in zip(abar_t, abar_prev, step_var):
        V = a * s**2 + 1 - a
        # x0hat = x0A x + x0B, epshat = eA x + eB
        x0A, x0B = math.sqrt(a) * s**2 / V, m - a * s**2 * m / V
        eA, eB = math.sqrt(1 - a) / V, -math.sqrt(1 - a) * math.sqrt(a) * m / V
        if kind == "ddim":
            c = math.sqrt(max(1 - ap - sig2, 0.0))
            A, B = math.sqrt(ap) * x0A + c * eA, math.sqrt(ap) * x0B + c * eB
        else:
            alpha = a / ap
            c1 = math.sqrt(ap) * (1 - alpha) / (1 - a)
            c2 = math.sqrt(alpha) * (1 - ap) / (1 - a)
            A, B = c1 * x0A + c2, c1 * x0B
        mean, var = A * mean + B, A * A * var + sig2
    return mean, var


def start_noise(schedule, t_first, m, s, n, gen):
    """x_T from the exact marginal q(x_t) at the first sampled timestep (isolates the sampler from the prior gap)."""
    a = schedule.alphas_cumprod[t_first].item()
    mean, var = math.sqrt(a) * m, a * s**2 + 1 - a
    return mean + math.sqrt(var) * torch.randn(n, generator=gen, dtype=torch.float64), mean, var


def ddim_reference(schedule, timesteps, eta, final_one=False):
    """CompVis make_ddim_sampling_parameters, written out: ascending ts -> alphas, alphas_prev, sigmas."""
    abar = schedule.alphas_cumprod.tolist()
    ts = sorted(timesteps)
    alphas = [abar[t] for t in ts]
    alphas_prev = [1.0 if final_one else abar[0]] + [abar[t] for t in ts[:-1]]
    sigmas = [eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap)) for a, ap in zip(alphas, alphas_prev)]
    # reverse to sampling order
    return alphas[::-1], alphas_prev[::-1], [x * x for x in sigmas[::-1]]


def check_moments(samples, mean_ref, var_ref, n_se=4.5):
    n = samples.numel()
    se_mean, se_var = math.sqrt(var_ref / n), var_ref * math.sqrt(2 / n)
    assert abs(samples.mean().item() - mean_ref) < n_se * se_mean, (samples.mean().item(), mean_ref)
    assert abs(samples.var().item() - var_ref) < n_se * se_var, (samples.var().item(), var_ref)
