"""DPM-Solver++(2M), Euler-ancestral and Heun (sigma-space samplers) against closed forms.

Gaussian data x0 ~ N(m, s^2) with its exact optimal model (tests/gaussian_reference.py). In the sigma variable
x = x_t / sqrt(abar) = x0 + sigma eps the optimal denoiser is D(x, sigma) = m + c(sigma) (x - m) with
c = s^2 / (s^2 + sigma^2), so each sampler step maps y = x - m linearly (plus noise for the ancestral sampler): the
exact moments of every discrete chain follow from a scalar recursion written here from the papers' step equations
(Karras et al. 2022 Alg. 1, Lu et al. 2022 Alg. 2, k-diffusion's ancestral split), independent of the library.
The exact probability-flow map between levels is y -> y sqrt((s^2 + sigma'^2) / (s^2 + sigma^2)), in DDPM space
x_t - sqrt(abar_t) m -> sqrt(V_s / V_t) (x_t - sqrt(abar_t) m) with V = abar s^2 + 1 - abar.

Every sampler ends with a denoising step from the smallest nonzero level sigma_last to 0, which returns
E[x0 | x at sigma_last]: its variance is s^2 - s^4 / (s^2 + sigma_last^2) short of s^2 (relative
sigma_last^2 / (s^2 + sigma_last^2): 0.34% for Karras sigmas, sigma_min = 0.029; larger for few uniform steps).
The recursions include it.
"""

import math

import pytest
import torch

from ldm.diffusion import (
    DDIMSampler,
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    HeunSampler,
    KarrasSampler,
    NoiseSchedule,
    Sampler,
    available_samplers,
    build_sampler,
    dpmpp_2m_step,
    euler_ancestral_step,
    euler_step,
    get_ancestral_step,
    heun_step,
    karras_sigmas,
    sigma_to_t,
    t_to_sigma,
)
from ldm.util import instantiate_from_config
from tests.gaussian_reference import check_moments, interpolated_alpha_cumprod, optimal_model, start_noise

M, S = 1.5, 0.5
N = 20_000
FAST = ("dpmpp_2m", "euler_a", "heun")


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("scaled_linear", 1000)


def table_sigmas(schedule):
    a = schedule.alphas_cumprod
    return ((1 - a) / a).sqrt()


# -- independent scalar recursions -------------------------------------------------------------------------------------


def chain_gain(kind, sigmas, s, eta=1.0):
    """(g, noise_var): after the chain y_out = g y_in + noise of variance noise_var, for D = m + c(sigma) y."""

    def c(sig):
        return s * s / (s * s + sig * sig)

    g, noise_var = 1.0, 0.0
    prev_D = None  # coefficient of y_in in D_previous - m (DPM++2M)
    for i in range(len(sigmas) - 1):
        sig, sig_n = sigmas[i], sigmas[i + 1]
        D = c(sig) * g  # D - m = c y
        if kind == "heun":  # Karras Alg. 1, churn 0: Euler predictor, trapezoid corrector; Euler to sigma = 0
            y_e = g + (sig_n - sig) * (g - D) / sig
            if sig_n == 0:
                g_new = y_e
            else:
                g_new = g + (sig_n - sig) / 2 * ((g - D) / sig + (y_e - c(sig_n) * y_e) / sig_n)
            noise_var *= (g_new / g) ** 2
            g = g_new
        elif kind == "dpmpp_2m":  # Lu et al. Alg. 2 with alpha = 1: x' = (sig'/sig) x - (e^-h - 1) D_corr
            if sig_n == 0:
                g = D
            else:
                h = math.log(sig / sig_n)
                D_corr = D
                if prev_D is not None:
                    r = math.log(sigmas[i - 1] / sig) / h
                    D_corr = (1 + 1 / (2 * r)) * D - 1 / (2 * r) * prev_D
                g = (sig_n / sig) * g - math.expm1(-h) * D_corr
            prev_D = D
        elif kind == "euler_a":  # x' = x + (sig_down - sig) (x - D) / sig + sig_up z
            sig_up = min(sig_n, eta * math.sqrt(sig_n**2 * (sig**2 - sig_n**2) / sig**2))
            sig_down = math.sqrt(sig_n**2 - sig_up**2)
            factor = 1 + (sig_down - sig) * (1 - c(sig)) / sig
            g *= factor
            noise_var = noise_var * factor**2 + sig_up**2
        else:
            raise AssertionError(kind)
    return g, noise_var


def chain_moments(kind, sigmas, m, s, mean0, var0, abar0, eta=1.0):
    """Exact mean/variance of the sampler's output for x_T ~ N(mean0, var0) in DDPM space at abar0."""
    g, noise_var = chain_gain(kind, sigmas, s, eta)
    mean_k, var_k = mean0 / math.sqrt(abar0), var0 / abar0  # x = x_t / sqrt(abar)
    return m + g * (mean_k - m), g * g * var_k + noise_var


# -- noise levels and timesteps ----------------------------------------------------------------------------------------


def test_karras_sigmas_formula():
    sigma_min, sigma_max = 0.0292, 14.6146
    for n, rho in ((10, 7.0), (25, 7.0), (7, 3.0), (2, 1.0)):
        sigmas = karras_sigmas(n, sigma_min, sigma_max, rho)
        assert sigmas.dtype == torch.float64 and sigmas.shape == (n + 1,)
        expected = [
            (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(n)
        ] + [0.0]
        torch.testing.assert_close(sigmas, torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)
        assert sigmas[0].item() == pytest.approx(sigma_max, rel=1e-14)
        assert sigmas[n - 1].item() == pytest.approx(sigma_min, rel=1e-13)
        assert sigmas[-1].item() == 0.0
        assert bool((sigmas[1:] < sigmas[:-1]).all())
    # rho = 1 is linear spacing; n = 1 is sigma_max alone
    torch.testing.assert_close(karras_sigmas(5, 1.0, 5.0, 1.0), torch.tensor([5.0, 4, 3, 2, 1, 0], dtype=torch.float64))
    assert karras_sigmas(1, sigma_min, sigma_max).tolist() == [pytest.approx(sigma_max), 0.0]


def test_sampler_sigma_grids(schedule):
    table = table_sigmas(schedule)
    sampler = DPMSolverPP2MSampler(schedule, num_steps=10)
    # defaults: the schedule's extreme noise levels (SD's 14.6146 ... 0.0292)
    assert sampler.sigmas[0].item() == pytest.approx(table[-1].item(), rel=1e-12)
    assert sampler.sigmas[0].item() == pytest.approx(14.6146, abs=1e-4)
    assert sampler.sigmas[-2].item() == pytest.approx(table[0].item(), rel=1e-12)
    assert sampler.timesteps.dtype == torch.float64
    assert sampler.timesteps[0].item() == pytest.approx(999.0, abs=1e-9)
    assert sampler.timesteps[-1].item() == pytest.approx(0.0, abs=1e-9)
    custom = HeunSampler(schedule, num_steps=5, sigma_min=0.1, sigma_max=10.0, rho=5.0)
    torch.testing.assert_close(custom.sigmas, karras_sigmas(5, 0.1, 10.0, 5.0))

    # uniform: sigma at the trailing timesteps 999, 979, ..., 19 (diffusers' timestep_spacing="trailing"), then 0
    uniform = EulerAncestralSampler(schedule, num_steps=50, sigma_spacing="uniform")
    assert uniform.timesteps.dtype == torch.int64
    assert uniform.timesteps.tolist() == list(range(999, 0, -20))
    a = schedule.alphas_cumprod.tolist()
    expected = [math.sqrt((1 - a[t]) / a[t]) for t in range(999, 0, -20)] + [0.0]
    torch.testing.assert_close(uniform.sigmas, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert EulerAncestralSampler(schedule, 4, sigma_spacing="uniform").timesteps.tolist() == [999, 749, 499, 249]


def test_sigma_t_interpolation_round_trips(schedule):
    table = table_sigmas(schedule)
    log_table = table.log()
    # on the integer grid
    t = sigma_to_t(table, log_table)
    torch.testing.assert_close(t, torch.arange(1000, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(t_to_sigma(torch.arange(1000), log_table), table, rtol=1e-12, atol=0)
    # fractional t: the independent interpolation of the test model, then back
    t_frac = torch.tensor([0.0, 0.25, 1.5, 17.3, 500.5, 998.01, 998.99, 999.0], dtype=torch.float64)
    a_frac = interpolated_alpha_cumprod(schedule, t_frac)
    sigma_ref = ((1 - a_frac) / a_frac).sqrt()
    torch.testing.assert_close(t_to_sigma(t_frac, log_table), sigma_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma_to_t(sigma_ref, log_table), t_frac, rtol=0, atol=1e-9)
    # log-sigma is linear in between: half way in t is the geometric mean of the neighbours
    mid = sigma_to_t((table[10] * table[11]).sqrt(), log_table)
    assert mid.item() == pytest.approx(10.5, abs=1e-12)
    # levels outside the table clamp to the ends (k-diffusion)
    assert sigma_to_t(torch.tensor([1e-4, 1e4]), log_table).tolist() == [0.0, 999.0]
    # a sampler's fractional timesteps are at its sigmas
    sampler = HeunSampler(schedule, num_steps=12)
    torch.testing.assert_close(t_to_sigma(sampler.timesteps, log_table), sampler.sigmas[:-1], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="t must lie"):
        t_to_sigma(torch.tensor([1000.0]), log_table)


# -- pure step functions -----------------------------------------------------------------------------------------------


def test_get_ancestral_step_is_the_ddpm_posterior():
    a, a_prev = 0.3, 0.7  # abar at the current and the next (less noisy) level
    sigma, sigma_next = math.sqrt((1 - a) / a), math.sqrt((1 - a_prev) / a_prev)
    down, up = get_ancestral_step(sigma, sigma_next, 1.0)
    # DDIM eq. 16 with eta = 1 (DDPM space), divided by sqrt(abar_prev) for the sigma variable
    ddim_sigma = math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    assert up.item() == pytest.approx(ddim_sigma / math.sqrt(a_prev), rel=1e-12)
    assert (down**2 + up**2).item() == pytest.approx(sigma_next**2, rel=1e-12)
    assert [v.item() for v in get_ancestral_step(sigma, sigma_next, 0.0)] == [pytest.approx(sigma_next), 0.0]
    down, up = get_ancestral_step(sigma, sigma_next, 50.0)  # sigma_up is capped at sigma_next
    assert up.item() == pytest.approx(sigma_next) and down.item() == 0.0
    down, up = get_ancestral_step(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]))
    assert up.tolist() == [pytest.approx(math.sqrt(1 * (4 - 1) / 4)), 0.0] and down[1].item() == 0.0


def test_step_functions_formulas():
    x, D, D_prev, z = (torch.randn(3, 4, dtype=torch.float64) for _ in range(4))
    s_prev, s, s_n = 3.0, 2.0, 1.2
    d = (x - D) / s
    torch.testing.assert_close(euler_step(x, D, s, s_n), x + (s_n - s) * d, rtol=1e-13, atol=1e-13)
    down, up = math.sqrt(s_n**2 - s_n**2 * (s**2 - s_n**2) / s**2), math.sqrt(s_n**2 * (s**2 - s_n**2) / s**2)
    expected = x + (down - s) * d + up * z
    torch.testing.assert_close(euler_ancestral_step(x, D, s, s_n, 1.0, z), expected, rtol=1e-13, atol=1e-13)
    x_e, D_e = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    expected = x + (s_n - s) * (d + (x_e - D_e) / s_n) / 2
    torch.testing.assert_close(heun_step(x, D, x_e, D_e, s, s_n), expected, rtol=1e-13, atol=1e-13)
    # Heun's correction of the Euler point is ((sigma / sigma_next) - 1) / 2 times the change of the denoiser
    x_e = euler_step(x, D, s, s_n)
    correction = heun_step(x, D, x_e, D_e, s, s_n) - x_e
    torch.testing.assert_close(correction, (s / s_n - 1) / 2 * (D_e - D), rtol=1e-12, atol=1e-12)
    # DPM-Solver++: first order is the DDIM / Euler step; second order with r = h_last / h (Lu et al. Alg. 2)
    h, h_last = math.log(s / s_n), math.log(s_prev / s)
    first = (s_n / s) * x - math.expm1(-h) * D
    torch.testing.assert_close(dpmpp_2m_step(x, D, s, s_n), first, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dpmpp_2m_step(x, D, s, s_n), euler_step(x, D, s, s_n), rtol=1e-13, atol=1e-13)
    r = h_last / h
    second = (s_n / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * D - 1 / (2 * r) * D_prev)
    torch.testing.assert_close(dpmpp_2m_step(x, D, s, s_n, D_prev, s_prev), second, rtol=1e-13, atol=1e-13)
    # the step to sigma = 0 returns the denoised x0 exactly, with or without history
    assert torch.equal(dpmpp_2m_step(x, D, s, 0.0, D_prev, s_prev), D)
    torch.testing.assert_close(euler_ancestral_step(x, D, s, 0.0, 1.0), D, rtol=0, atol=1e-14)
    # per-sample sigmas [B]
    s_b, s_n_b = torch.tensor([2.0, 1.0, 5.0]), torch.tensor([1.0, 0.5, 0.0])
    out = dpmpp_2m_step(x, D, s_b, s_n_b)
    for i in range(3):
        torch.testing.assert_close(out[i], dpmpp_2m_step(x[i : i + 1], D[i : i + 1], s_b[i].item(), s_n_b[i].item())[0])


# -- wiring: what model_fn sees, callbacks, evaluation counts ----------------------------------------------------------


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("spacing", ["karras", "uniform"])
@pytest.mark.parametrize("num_steps", [1, 2, 7])
def test_num_model_evaluations_counts_calls(schedule, name, spacing, num_steps):
    sampler = build_sampler(name, schedule, num_steps=num_steps, sigma_spacing=spacing)
    calls = []

    def model(x, t, cond):
        calls.append(t)
        return torch.zeros_like(x)

    x_T = torch.randn(2, 3, dtype=torch.float64)
    sampler.sample(model, x_T, generator=torch.Generator().manual_seed(0), progress=False)
    assert len(calls) == sampler.num_model_evaluations
    assert sampler.num_model_evaluations == (2 * num_steps - 1 if name == "heun" else num_steps)
    assert sampler.num_steps == num_steps


@pytest.mark.parametrize("name", FAST)
def test_model_inputs_and_callback(schedule, name):
    sampler = build_sampler(name, schedule, num_steps=6)
    seen, reported = [], []

    def model(x, t, cond):
        assert cond == "c" and t.shape == (x.shape[0],)
        seen.append((x.clone(), t.clone()))
        return 0.1 * torch.tanh(x)

    x_T = torch.randn(4, 2, 3, dtype=torch.float64)
    out = sampler.sample(model, x_T, "c", torch.Generator().manual_seed(1), False, lambda *a: reported.append(a))
    assert out.shape == x_T.shape and out.dtype == torch.float64
    # the first call sees x_T itself (DDPM space) at the first timestep, fractional t in float64 for float64 x
    torch.testing.assert_close(seen[0][0], x_T, rtol=1e-14, atol=1e-14)
    assert seen[0][1].dtype == torch.float64
    torch.testing.assert_close(seen[0][1], torch.full((4,), 999.0, dtype=torch.float64))
    # callback(i, t_i, x_t in DDPM space, pred_x0), once per step
    assert [r[0] for r in reported] == list(range(6))
    assert [r[1] for r in reported] == pytest.approx(sampler.timesteps.tolist())
    assert torch.equal(reported[0][2], seen[0][0])
    a0 = 1 / (1 + sampler.sigmas[0].item() ** 2)
    torch.testing.assert_close(reported[0][3], (x_T - math.sqrt(1 - a0) * 0.1 * torch.tanh(x_T)) / math.sqrt(a0))
    # float32 samples: float32 timesteps (an int64 grid for uniform spacing)
    ts = []
    sampler.sample(lambda x, t, c: ts.append(t) or torch.zeros_like(x), x_T.float(), progress=False,
                   generator=torch.Generator().manual_seed(1))
    assert ts[0].dtype == torch.float32
    uniform = build_sampler(name, schedule, num_steps=6, sigma_spacing="uniform")
    ts = []
    uniform.sample(lambda x, t, c: ts.append(t) or torch.zeros_like(x), x_T.float(), progress=False,
                   generator=torch.Generator().manual_seed(1))
    assert ts[0].dtype == torch.int64 and ts[0].tolist() == [999] * 4


# -- step for step against written-out algorithms ----------------------------------------------------------------------


def test_euler_ancestral_uniform_is_ddim_eta_1(schedule):
    """Same noise draws -> the same trajectory: Euler-a (eta=1) on the trailing grid is DDIM(eta=1) ending at abar=1."""
    model = lambda x, t, c: torch.tanh(x) * (t.view(-1, 1).double() / 1000) + 0.1 * c  # noqa: E731
    x_T, cond = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    euler_a = EulerAncestralSampler(schedule, 20, sigma_spacing="uniform", parameterization="eps")
    ddim = DDIMSampler(schedule, 20, eta=1.0, timestep_spacing="trailing", set_alpha_to_one=True)
    out = euler_a.sample(model, x_T, cond, torch.Generator().manual_seed(3), False)
    ref = ddim.sample(model, x_T, cond, torch.Generator().manual_seed(3), False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # eta = 0 is the Euler method = DDIM(eta=0)
    euler = EulerAncestralSampler(schedule, 20, eta=0.0, sigma_spacing="uniform")
    ddim0 = DDIMSampler(schedule, 20, eta=0.0, timestep_spacing="trailing", set_alpha_to_one=True)
    out, ref = euler.sample(model, x_T, cond, progress=False), ddim0.sample(model, x_T, cond, progress=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_dpmpp_2m_is_lu_et_al_algorithm_2(schedule, parameterization):
    """DPM-Solver++(2M) written in DDPM space (alpha_t = sqrt(abar), sigma_t = sqrt(1 - abar),
    lambda = log(alpha_t / sigma_t)) with a data prediction from a nonlinear model; the last step, to clean data,
    returns the data prediction (k-diffusion's first-order final step)."""
    model = lambda x, t, c: torch.sin(x) * (1 + t.view(-1, 1).double() / 1000) + 0.2 * c  # noqa: E731
    x_T, cond = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    steps = 8
    out = DPMSolverPP2MSampler(schedule, steps, sigma_spacing="uniform", parameterization=parameterization).sample(
        model, x_T, cond, progress=False
    )
    abar = schedule.alphas_cumprod.tolist()
    ts = [round(1000 - i * 1000 / steps) - 1 for i in range(steps)]  # trailing
    alpha = [math.sqrt(abar[t]) for t in ts] + [1.0]
    sig = [math.sqrt(1 - abar[t]) for t in ts] + [0.0]
    lam = [math.log(a / s) for a, s in zip(alpha[:-1], sig[:-1])]

    def data_prediction(x, i):
        output = model(x, torch.full((3,), ts[i]), cond)
        if parameterization == "eps":
            return (x - sig[i] * output) / alpha[i]
        return alpha[i] * x - sig[i] * output

    x, x0_prev = x_T, None
    for i in range(steps):
        x0 = data_prediction(x, i)
        if i == steps - 1:
            x = x0
            break
        h = lam[i + 1] - lam[i]
        if x0_prev is None:
            D = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = sig[i + 1] / sig[i] * x - alpha[i + 1] * math.expm1(-h) * D
        x0_prev = x0
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)


def test_heun_is_karras_algorithm_1(schedule):
    """Karras et al. Alg. 1 (churn 0) in the sigma variable with Karras sigmas and fractional timesteps."""
    model = lambda x, t, c: torch.tanh(x) * (t.view(-1, 1) / 1000) - 0.3 * x  # noqa: E731
    x_T = torch.randn(4, 3, dtype=torch.float64)
    sampler = HeunSampler(schedule, 9, parameterization="x0")
    out = sampler.sample(model, x_T, progress=False)
    sigmas, ts = sampler.sigmas.tolist(), sampler.timesteps

    def D(x, i):  # x0-prediction model called on x_t = x / sqrt(1 + sigma^2) at t_i
        return model(x / math.sqrt(1 + sigmas[i] ** 2), ts[i].expand(4), None)

    x = x_T * math.sqrt(1 + sigmas[0] ** 2)
    for i in range(9):
        d = (x - D(x, i)) / sigmas[i]
        x_e = x + (sigmas[i + 1] - sigmas[i]) * d
        if sigmas[i + 1] == 0:
            x = x_e
        else:
            d_e = (x_e - D(x_e, i + 1)) / sigmas[i + 1]
            x = x + (sigmas[i + 1] - sigmas[i]) * (d + d_e) / 2
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)


# -- Gaussian data with the optimal model ------------------------------------------------------------------------------

# (sampler, spacing, parameterization, steps, bound on the chain's own relative variance error)
GAUSSIAN_CASES = [
    ("dpmpp_2m", "karras", "eps", 50, 0.002),
    ("dpmpp_2m", "karras", "v", 50, 0.002),
    ("dpmpp_2m", "uniform", "eps", 500, 0.007),
    ("dpmpp_2m", "uniform", "v", 500, 0.007),
    ("heun", "karras", "eps", 50, 0.002),
    ("heun", "karras", "x0", 50, 0.002),
    ("heun", "uniform", "v", 500, 0.008),
    # first order and stochastic: the variance is ~8/n low (3.2% at 250 Karras steps, 5.8% uniform)
    ("euler_a", "karras", "eps", 250, 0.035),
    ("euler_a", "uniform", "v", 250, 0.065),
]


@pytest.mark.parametrize("name,spacing,parameterization,steps,bias_bound", GAUSSIAN_CASES)
def test_samples_gaussian_data(schedule, name, spacing, parameterization, steps, bias_bound):
    sampler = build_sampler(name, schedule, num_steps=steps, sigma_spacing=spacing, parameterization=parameterization)
    gen = torch.Generator().manual_seed(17)
    x_T, mean0, var0 = start_noise(schedule, 999, M, S, N, gen)  # sigma_0 is the level of t = 999 for both spacings
    out = sampler.sample(optimal_model(schedule, M, S, parameterization), x_T, generator=gen, progress=False)
    assert out.dtype == torch.float64 and out.shape == (N,)
    abar0 = schedule.alphas_cumprod[999].item()
    mean_ref, var_ref = chain_moments(name, sampler.sigmas.tolist(), M, S, mean0, var0, abar0)
    # the chain is unbiased in the mean; its variance error (discretisation + final denoising) is quantified ...
    assert abs(mean_ref - M) < 1e-9
    bias = (var_ref - S**2) / S**2
    assert abs(bias) < bias_bound, bias
    # ... the samples match the chain's exact moments within Monte Carlo error ...
    check_moments(out, mean_ref, var_ref)
    # ... and the data's within Monte Carlo error plus that bias (4.5 standard errors of 1% each for N = 20000)
    assert abs(out.mean().item() - M) < 4.5 * S / math.sqrt(N)
    assert abs(out.var().item() - S**2) < S**2 * (4.5 * math.sqrt(2 / N) + abs(bias))


def test_discretisation_errors_shrink_with_steps(schedule):
    """The recursion's variance error: with Karras sigmas, second-order DPM++2M and Heun converge to the final
    denoising gap -sigma_min^2 / (s^2 + sigma_min^2) = -0.34% with error ~ 1/n^2 (4x the steps, ~1/16 the error);
    Euler-a is first order (2x the steps, half the error)."""
    gap = -(table_sigmas(schedule)[0].item() ** 2) / (S**2 + table_sigmas(schedule)[0].item() ** 2)

    def bias(name, n, spacing="karras"):
        sigmas = build_sampler(name, schedule, num_steps=n, sigma_spacing=spacing).sigmas.tolist()
        g, noise_var = chain_gain(name, sigmas, S)
        return (g * g * (S**2 + sigmas[0] ** 2) + noise_var - S**2) / S**2

    for name in ("dpmpp_2m", "heun"):
        assert abs(bias(name, 10)) > 0.05  # 10 Karras steps are visibly off for this narrow Gaussian
        assert abs(bias(name, 50) - gap) < 0.006  # 0.0042 (DPM++2M), 0.0042 (Heun)
        assert abs(bias(name, 200) - gap) < abs(bias(name, 50) - gap) / 8
    ratio = bias("euler_a", 500) / bias("euler_a", 250)
    assert 0.45 < ratio < 0.6 and bias("euler_a", 250) < 0


def test_dpmpp_2m_beats_ddim_on_the_exact_ode(schedule):
    """Against the exact probability-flow map of Gaussian data (x_t - sqrt(abar_t) m scaled by sqrt(V_s / V_t)):
    the second-order solvers' error at the last nonzero level is far below DDIM's on the same timesteps."""
    x_T = torch.randn(2000, dtype=torch.float64)
    a = schedule.alphas_cumprod.tolist()
    V = [ai * S**2 + 1 - ai for ai in a]
    model = optimal_model(schedule, M, S)

    def error_at_last_level(sampler):
        captured = {}
        sampler.sample(model, x_T, progress=False, callback=lambda i, t, x, x0: captured.update(t=t, x=x))
        t = int(captured["t"])
        exact = math.sqrt(a[t]) * M + math.sqrt(V[t] / V[999]) * (x_T - math.sqrt(a[999]) * M)
        return (captured["x"] - exact).abs().max().item()

    for steps in (10, 20):
        ddim = error_at_last_level(DDIMSampler(schedule, steps, timestep_spacing="trailing", set_alpha_to_one=True))
        dpm = error_at_last_level(DPMSolverPP2MSampler(schedule, steps, sigma_spacing="uniform"))
        heun = error_at_last_level(HeunSampler(schedule, steps, sigma_spacing="uniform"))
        euler = error_at_last_level(EulerAncestralSampler(schedule, steps, eta=0.0, sigma_spacing="uniform"))
        assert ddim > 0.05  # DDIM is visibly off at 10-20 steps (0.14, 0.10)
        assert dpm < 0.15 * ddim  # measured 0.10x and 0.07x
        assert heun < 0.35 * ddim  # 0.29x and 0.13x (Heun uses 2x the evaluations)
        assert euler == pytest.approx(ddim, rel=1e-9)  # the Euler step is the DDIM step


@pytest.mark.parametrize("name", ["dpmpp_2m", "heun"])
@pytest.mark.parametrize("spacing", ["karras", "uniform"])
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_single_data_point_is_recovered(schedule, name, spacing, parameterization):
    sampler = build_sampler(name, schedule, num_steps=15, sigma_spacing=spacing, parameterization=parameterization)
    x_T = torch.randn(512, dtype=torch.float64)
    out = sampler.sample(optimal_model(schedule, M, 0.0, parameterization), x_T, progress=False)
    torch.testing.assert_close(out, torch.full_like(x_T, M), rtol=0, atol=1e-5)


def test_zero_terminal_snr_v_prediction(schedule):
    """sigma_max ~ 4.5e3 (the stored abar_999 ~ 4.9e-8): Karras sigmas reach it and the samples match the chain.
    The log-sigma range is twice SD's, so the same accuracy takes more steps: variance +4.0% at 50, +0.7% at 100."""
    zsnr = NoiseSchedule("scaled_linear", 1000, rescale_zero_terminal_snr=True)
    sampler = DPMSolverPP2MSampler(zsnr, 100, parameterization="v")
    assert sampler.sigmas[0].item() > 4000
    gen = torch.Generator().manual_seed(4)
    x_T, mean0, var0 = start_noise(zsnr, 999, M, S, N, gen)
    out = sampler.sample(optimal_model(zsnr, M, S, "v"), x_T, progress=False)
    assert torch.isfinite(out).all()
    abar0 = zsnr.alphas_cumprod[999].item()
    mean_ref, var_ref = chain_moments("dpmpp_2m", sampler.sigmas.tolist(), M, S, mean0, var0, abar0)
    assert abs(mean_ref - M) < 1e-9 and abs(var_ref - S**2) < 0.01 * S**2
    check_moments(out, mean_ref, var_ref)
    check_moments(out, M, S**2)


def test_float32_matches_float64(schedule):
    sampler = DPMSolverPP2MSampler(schedule, 20)
    model = optimal_model(schedule, M, S)
    x_T = torch.randn(256, dtype=torch.float64)
    out64 = sampler.sample(model, x_T, progress=False)
    out32 = sampler.sample(model, x_T.float(), progress=False)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-4)


# -- registry, config, bad input ---------------------------------------------------------------------------------------


def test_registry_and_config(schedule):
    assert set(FAST) <= set(available_samplers())
    for name, cls in (("dpmpp_2m", DPMSolverPP2MSampler), ("euler_a", EulerAncestralSampler), ("heun", HeunSampler)):
        sampler = build_sampler(name, schedule, num_steps=10, parameterization="v")
        assert type(sampler) is cls and isinstance(sampler, KarrasSampler) and isinstance(sampler, Sampler)
        assert sampler.name == name and sampler.parameterization == "v"
        assert "sigma_spacing='karras'" in repr(sampler)
    assert build_sampler("euler_a", schedule, num_steps=5, eta=0.5).eta == 0.5
    built = instantiate_from_config(
        {"target": "ldm.diffusion.HeunSampler", "params": {"num_steps": 12, "sigma_spacing": "uniform"}},
        schedule=schedule,
    )
    assert built.num_model_evaluations == 23
    # the existing samplers are untouched
    assert type(build_sampler("ddim", schedule, num_steps=10)) is DDIMSampler


@pytest.mark.parametrize("name", FAST)
def test_bad_inputs(name):
    schedule = NoiseSchedule("linear", 100)
    for bad in (0, 101, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            build_sampler(name, schedule, num_steps=bad)
    for bad in (0, -1.0, float("inf"), "7"):
        with pytest.raises(ValueError, match="rho"):
            build_sampler(name, schedule, num_steps=10, rho=bad)
    with pytest.raises(ValueError, match="sigma_spacing"):
        build_sampler(name, schedule, num_steps=10, sigma_spacing="exponential")
    with pytest.raises(ValueError, match="sigma_max"):
        build_sampler(name, schedule, num_steps=10, sigma_max=1e6)
    with pytest.raises(ValueError, match="sigma_min"):
        build_sampler(name, schedule, num_steps=10, sigma_min=1e-6)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        build_sampler(name, schedule, num_steps=10, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="'karras' only"):
        build_sampler(name, schedule, num_steps=10, sigma_spacing="uniform", sigma_max=1.0)
    with pytest.raises(ValueError, match="eps, x0, v"):
        build_sampler(name, schedule, num_steps=10, parameterization="epsilon")
    sampler = build_sampler(name, schedule, num_steps=3)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(lambda x, t, c: x[:, :1], torch.randn(2, 3), progress=False)
    with pytest.raises(ValueError, match="floating"):
        sampler.sample(lambda x, t, c: x, torch.zeros(2, 3, dtype=torch.long), progress=False)


def test_bad_inputs_of_pure_functions():
    with pytest.raises(ValueError, match="eta"):
        EulerAncestralSampler(NoiseSchedule("linear", 100), 10, eta=-0.5)
    with pytest.raises(ValueError, match="rho"):
        karras_sigmas(10, 0.1, 10.0, rho=0.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(10, 10.0, 0.1)
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0, 0.1, 10.0)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="noise"):
        euler_ancestral_step(x, x, 2.0, 1.0, 1.0, None)
    with pytest.raises(ValueError, match="sigma_next > 0"):
        heun_step(x, x, x, x, 2.0, 0.0)
    with pytest.raises(ValueError, match="together"):
        dpmpp_2m_step(x, x, 2.0, 1.0, previous_denoised=x)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        dpmpp_2m_step(x, x, 1.0, 2.0)
