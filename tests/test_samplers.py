"""DDPM / DDIM samplers driven by the closed-form optimal model of Gaussian data x0 ~ N(m, s^2).

For that data every conditional is Gaussian: with ``V = abar s^2 + 1 - abar`` and ``d = x_t - sqrt(abar) m``,
``E[eps | x_t] = sqrt(1 - abar) d / V`` and ``E[x0 | x_t] = m + sqrt(abar) s^2 d / V``. Each sampler step is then an
affine map of ``x_t`` plus Gaussian noise, so the exact mean and variance of the discrete chain follow from a scalar
recursion written here from the papers' equations (DDPM eq. 6-7, DDIM eq. 12/16), independent of the library.

Sample sizes stay below 32768 elements and the tests run torch single-threaded: on shared CI cores contended
intra-op threads cost milliseconds per elementwise op (sqrt, exp), far more than the arithmetic itself.
"""

import math

import pytest
import torch

from ldm.diffusion import (
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    Sampler,
    available_samplers,
    build_sampler,
    ddim_sigma,
    ddim_step,
    ddpm_step,
    make_timesteps,
)
from ldm.util import instantiate_from_config
from tests.gaussian_reference import check_moments, ddim_reference, exact_chain_moments, optimal_model, start_noise

M, S = 1.5, 0.5
N = 20_000


# -- timesteps -------------------------------------------------------------------------------------------------------


def test_ddim_timesteps_match_stable_diffusion():
    schedule = NoiseSchedule("scaled_linear", 1000)
    sampler = DDIMSampler(schedule, num_steps=50, eta=0.0)
    assert sampler.timesteps.dtype == torch.int64
    assert sampler.timesteps.tolist() == list(range(981, 0, -20))  # 981, 961, ..., 1
    # CompVis: np.asarray(list(range(0, T, T // n))) + 1
    assert sorted(sampler.timesteps.tolist()) == [t + 1 for t in range(0, 1000, 1000 // 50)]
    assert sampler.num_model_evaluations == 50 and sampler.num_steps == 50
    alphas, alphas_prev, variances = ddim_reference(schedule, sampler.timesteps.tolist(), eta=0.0)
    torch.testing.assert_close(sampler.alphas_cumprod_prev, torch.tensor(alphas_prev, dtype=torch.float64))
    assert sampler.alphas_cumprod_prev[-1].item() == schedule.alphas_cumprod[0].item()
    assert bool((sampler.variances == 0).all())

    eta1 = DDIMSampler(schedule, num_steps=50, eta=1.0)
    _, _, variances = ddim_reference(schedule, eta1.timesteps.tolist(), eta=1.0)
    torch.testing.assert_close(eta1.variances, torch.tensor(variances, dtype=torch.float64), rtol=1e-10, atol=0)


def test_ddim_step_for_step_like_compvis():
    """CompVis p_sample_ddim written out: pred_x0 = (x - sqrt(1 - a_t) e_t) / sqrt(a_t),
    x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma_t^2) e_t + sigma_t z, with a nonlinear eps model."""
    schedule = NoiseSchedule("scaled_linear", 1000)
    eta, steps = 0.7, 10
    sampler = DDIMSampler(schedule, steps, eta=eta)
    model = lambda x, t, c: torch.tanh(x) * (t.view(-1, 1).double() / 1000) + 0.1 * c  # noqa: E731
    x_T = torch.randn(4, 6, dtype=torch.float64)
    cond = torch.randn(4, 6, dtype=torch.float64)
    out = sampler.sample(model, x_T, cond, torch.Generator().manual_seed(9), progress=False)

    abar = schedule.alphas_cumprod.tolist()
    ts = [t + 1 for t in range(0, 1000, 1000 // steps)]  # make_ddim_timesteps('uniform', 10, 1000)
    alphas = [abar[t] for t in ts]
    alphas_prev = [abar[0]] + alphas[:-1]
    sigmas = [eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap)) for a, ap in zip(alphas, alphas_prev)]
    gen = torch.Generator().manual_seed(9)
    x = x_T
    for i in reversed(range(steps)):
        t = torch.full((4,), ts[i], dtype=torch.long)
        e_t = model(x, t, cond)
        a_t, a_prev, sigma_t = alphas[i], alphas_prev[i], sigmas[i]
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        dir_xt = math.sqrt(1 - a_prev - sigma_t**2) * e_t
        noise = sigma_t * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x = math.sqrt(a_prev) * pred_x0 + dir_xt + noise
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_is_algorithm_2(variance):
    """DDPM Algorithm 2: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z, z = 0 at the
    last step (the eps form of the posterior mean), with a nonlinear eps model."""
    schedule = NoiseSchedule("linear", 50, beta_start=1e-3, beta_end=0.2)
    model = lambda x, t, c: torch.sin(x) * (1 + t.view(-1, 1).double() / 50)  # noqa: E731
    x_T = torch.randn(3, 5, dtype=torch.float64)
    out = DDPMSampler(schedule, variance=variance).sample(model, x_T, None, torch.Generator().manual_seed(4), False)
    betas = schedule.betas.tolist()
    abar = [math.prod(1 - b for b in betas[: t + 1]) for t in range(50)]
    gen = torch.Generator().manual_seed(4)
    x = x_T
    for t in reversed(range(50)):
        eps = model(x, torch.full((3,), t), None)
        mean = (x - betas[t] / math.sqrt(1 - abar[t]) * eps) / math.sqrt(1 - betas[t])
        if t > 0:
            var = betas[t] if variance == "beta" else betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
            x = mean + math.sqrt(var) * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        else:
            x = mean
    torch.testing.assert_close(out, x, rtol=1e-9, atol=1e-9)


def test_other_spacings():
    assert make_timesteps(1000, 50, "trailing").tolist() == list(range(999, 0, -20))
    assert make_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert make_timesteps(1000, 10, "leading", steps_offset=0).tolist() == list(range(900, -1, -100))
    assert make_timesteps(1000, 1000, "trailing").tolist() == list(range(999, -1, -1))
    # exactly num_steps entries even when num_steps does not divide T
    assert len(make_timesteps(1000, 7, "leading")) == 7
    ts = DDIMSampler(NoiseSchedule("linear", 1000), 3, timestep_spacing="trailing").timesteps
    assert ts.tolist() == [999, 666, 332]


def test_ddim_eta1_with_all_steps_has_ddpm_posterior_variance():
    schedule = NoiseSchedule("linear", 1000)
    for spacing, offset in (("trailing", 1), ("leading", 0)):
        sampler = DDIMSampler(schedule, num_steps=1000, eta=1.0, timestep_spacing=spacing, steps_offset=offset)
        assert sampler.timesteps.tolist() == list(range(999, -1, -1))
        beta_tilde = schedule.posterior_variance.flip(0)  # in sampling order
        torch.testing.assert_close(sampler.variances[:-1], beta_tilde[:-1], rtol=1e-9, atol=0)
        assert sampler.variances[-1].item() == 0.0  # t = 0: beta~_0 = 0
    # pure function, per t: beta~_t = eta^2 (1 - abar_{t-1}) / (1 - abar_t) (1 - abar_t / abar_{t-1}) at eta = 1
    t = torch.arange(1, 1000)
    sig = ddim_sigma(schedule.alphas_cumprod[t], schedule.alphas_cumprod[t - 1], 1.0)
    torch.testing.assert_close(sig**2, schedule.posterior_variance[t], rtol=1e-9, atol=0)


def test_ddim_eta1_all_steps_is_ddpm_sampling():
    """Same noise draws -> the same trajectory: DDIM(eta=1, T steps, ending at abar=1) == DDPM with beta~."""
    schedule = NoiseSchedule("linear", 1000)
    model = optimal_model(schedule, M, S)
    x_T = torch.randn(64, dtype=torch.float64)
    ddim = DDIMSampler(schedule, 1000, eta=1.0, timestep_spacing="trailing", set_alpha_to_one=True)
    out_ddim = ddim.sample(model, x_T, generator=torch.Generator().manual_seed(3), progress=False)
    out_ddpm = DDPMSampler(schedule).sample(model, x_T, generator=torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(out_ddim, out_ddpm, rtol=0, atol=1e-9)


# -- sampling the Gaussian with the optimal model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "variance,parameterization", [("beta_tilde", "eps"), ("beta", "eps"), ("beta_tilde", "x0"), ("beta_tilde", "v")]
)
def test_ddpm_samples_gaussian_data(variance, parameterization):
    schedule = NoiseSchedule("linear", 1000)
    sampler = DDPMSampler(schedule, variance=variance, parameterization=parameterization)
    assert sampler.num_model_evaluations == 1000
    gen = torch.Generator().manual_seed(11)
    x_T, mean0, var0 = start_noise(schedule, 999, M, S, N, gen)
    out = sampler.sample(optimal_model(schedule, M, S, parameterization), x_T, generator=gen, progress=False)
    assert out.dtype == torch.float64 and out.shape == (N,)
    # the exact moments of the 1000-step chain (independent recursion) are within 2% of the data's ...
    abar = schedule.alphas_cumprod.tolist()[::-1]
    abar_prev = abar[1:] + [1.0]
    if variance == "beta":
        step_var = [1 - a / ap for a, ap in zip(abar, abar_prev)]
    else:
        step_var = [(1 - a / ap) * (1 - ap) / (1 - a) for a, ap in zip(abar, abar_prev)]
    step_var[-1] = 0.0
    mean_ref, var_ref = exact_chain_moments(abar, abar_prev, step_var, "ddpm", M, S, mean0, var0)
    assert abs(mean_ref - M) < 1e-9 and abs(var_ref - S**2) < 0.02 * S**2
    # ... and the samples match both within Monte Carlo error
    check_moments(out, mean_ref, var_ref)
    check_moments(out, M, S**2)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_ddim_50_steps_samples_gaussian_data(eta, parameterization):
    """50 DDIM steps match the exact moments of their discrete chain; that chain is a first-order discretisation,
    whose variance is a few percent low for this narrow Gaussian (the recursion quantifies it)."""
    schedule = NoiseSchedule("scaled_linear", 1000)
    sampler = DDIMSampler(schedule, num_steps=50, eta=eta, parameterization=parameterization)
    gen = torch.Generator().manual_seed(5)
    x_T, mean0, var0 = start_noise(schedule, 981, M, S, N, gen)
    out = sampler.sample(optimal_model(schedule, M, S, parameterization), x_T, generator=gen, progress=False)
    abar_t, abar_prev, step_var = ddim_reference(schedule, sampler.timesteps.tolist(), eta)
    mean_ref, var_ref = exact_chain_moments(abar_t, abar_prev, step_var, "ddim", M, S, mean0, var0)
    # CompVis ends at abar_0, not 1: the target is the marginal at t = 0, N(sqrt(abar_0) m, abar_0 s^2 + 1 - abar_0)
    a0 = schedule.alphas_cumprod[0].item()
    assert abs(mean_ref - math.sqrt(a0) * M) < 1e-9
    assert abs(var_ref - (a0 * S**2 + 1 - a0)) < (0.12 if eta == 0 else 0.2) * S**2
    check_moments(out, mean_ref, var_ref)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_all_steps_samples_gaussian_data(eta):
    schedule = NoiseSchedule("linear", 1000)
    sampler = DDIMSampler(
        schedule, 1000, eta=eta, parameterization="v", timestep_spacing="trailing", set_alpha_to_one=True
    )
    gen = torch.Generator().manual_seed(8)
    x_T, _, _ = start_noise(schedule, 999, M, S, N, gen)
    out = sampler.sample(optimal_model(schedule, M, S, "v"), x_T, generator=gen, progress=False)
    check_moments(out, M, S**2)


def test_parameterizations_give_the_same_samples():
    schedule = NoiseSchedule("scaled_linear", 1000)
    x_T = torch.randn(256, dtype=torch.float64)
    outs = []
    for parameterization in ("eps", "x0", "v"):
        sampler = DDIMSampler(schedule, 20, eta=0.5, parameterization=parameterization)
        model = optimal_model(schedule, M, S, parameterization)
        outs.append(sampler.sample(model, x_T, generator=torch.Generator().manual_seed(0), progress=False))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_single_data_point_is_recovered_exactly(parameterization):
    schedule = NoiseSchedule("scaled_linear", 1000)
    model = optimal_model(schedule, M, 0.0, parameterization)
    x_T = torch.randn(512, dtype=torch.float64)
    ddim_one = DDIMSampler(schedule, 50, eta=0.0, parameterization=parameterization, set_alpha_to_one=True)
    torch.testing.assert_close(ddim_one.sample(model, x_T, progress=False), torch.full_like(x_T, M), rtol=0, atol=1e-6)
    # default (CompVis) ending at abar_0: the deterministic path keeps eps_T = (x_T - sqrt(a_T) m) / sqrt(1 - a_T)
    ddim = DDIMSampler(schedule, 50, eta=0.0, parameterization=parameterization)
    a_T, a0 = schedule.alphas_cumprod[981].item(), schedule.alphas_cumprod[0].item()
    eps_T = (x_T - math.sqrt(a_T) * M) / math.sqrt(1 - a_T)
    expected = math.sqrt(a0) * M + math.sqrt(1 - a0) * eps_T
    torch.testing.assert_close(ddim.sample(model, x_T, progress=False), expected, rtol=0, atol=1e-6)
    # DDPM's last step has no noise and abar_prev = 1: also exact
    ddpm = DDPMSampler(schedule, parameterization=parameterization, num_steps=100)
    out = ddpm.sample(model, x_T, generator=torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(out, torch.full_like(x_T, M), rtol=0, atol=1e-6)


def test_zero_terminal_snr_v_prediction_trailing():
    schedule = NoiseSchedule("scaled_linear", 1000, rescale_zero_terminal_snr=True)
    sampler = DDIMSampler(schedule, 50, eta=0.0, parameterization="v", timestep_spacing="trailing")
    assert sampler.timesteps[0].item() == 999
    gen = torch.Generator().manual_seed(2)
    x_T = torch.randn(N, generator=gen, dtype=torch.float64)  # exact prior: abar_999 ~ 5e-8
    out = sampler.sample(optimal_model(schedule, M, S, "v"), x_T, generator=gen, progress=False)
    assert torch.isfinite(out).all()
    abar_t, abar_prev, step_var = ddim_reference(schedule, sampler.timesteps.tolist(), 0.0)
    a = schedule.alphas_cumprod[999].item()
    mean_ref, var_ref = exact_chain_moments(
        abar_t, abar_prev, step_var, "ddim", M, S, math.sqrt(a) * M, a * S**2 + 1 - a
    )
    check_moments(out, mean_ref, var_ref)


# -- pure step functions -----------------------------------------------------------------------------------------------


def test_ddim_step_formula():
    x_t, x0, eps, z = (torch.randn(3, 4, dtype=torch.float64) for _ in range(4))
    a, ap, eta = 0.3, 0.6, 0.7
    sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    expected = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps + sigma * z
    torch.testing.assert_close(ddim_step(x_t, x0, eps, a, ap, eta, z), expected, rtol=1e-12, atol=1e-12)
    # per-sample coefficients [B]
    a_b, ap_b = torch.tensor([0.3, 0.5, 0.1]), torch.tensor([0.6, 0.9, 0.2])
    out = ddim_step(x_t, x0, eps, a_b, ap_b, 0.0)
    for i in range(3):
        a_i, ap_i = a_b[i].item(), ap_b[i].item()
        torch.testing.assert_close(out[i], math.sqrt(ap_i) * x0[i] + math.sqrt(1 - ap_i) * eps[i])
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x_t, x0, eps, a, ap, 0.5, None)


def test_ddpm_step_matches_posterior_tables():
    schedule = NoiseSchedule("linear", 1000)
    x_t, x0, z = (torch.randn(4, 5, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([1, 10, 500, 999])
    mean, var, _ = schedule.q_posterior(x0, x_t, t)
    out = ddpm_step(x_t, x0, schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t], z)
    torch.testing.assert_close(out, mean + var.sqrt() * z, rtol=1e-9, atol=1e-12)
    out_beta = ddpm_step(x_t, x0, schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t], z, "beta")
    torch.testing.assert_close(out_beta, mean + schedule.betas[t].sqrt()[:, None] * z, rtol=1e-9, atol=1e-12)


# -- the shared interface --------------------------------------------------------------------------------------------


def test_callback_generator_dtype_and_clip():
    schedule = NoiseSchedule("scaled_linear", 1000)
    sampler = DDIMSampler(schedule, 10, eta=1.0)
    calls = []

    def model(x, t, cond):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],) and cond == "c"
        return torch.zeros_like(x)

    x_T = torch.randn(2, 3, 8, 8)
    out = sampler.sample(model, x_T, cond="c", progress=False, callback=lambda i, t, x, x0: calls.append((i, t)))
    assert out.dtype == torch.float32 and out.shape == x_T.shape
    assert calls == list(enumerate(sampler.timesteps.tolist()))
    a = sampler.sample(model, x_T, cond="c", generator=torch.Generator().manual_seed(1), progress=False)
    b = sampler.sample(model, x_T, cond="c", generator=torch.Generator().manual_seed(1), progress=False)
    c = sampler.sample(model, x_T, cond="c", generator=torch.Generator().manual_seed(2), progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)

    # clip_denoised clamps the x0 prediction; DDIM eta=0 ending at abar=1 returns it
    clipped = DDIMSampler(schedule, 5, parameterization="x0", clip_denoised=1.0, set_alpha_to_one=True)
    out = clipped.sample(lambda x, t, c: torch.full_like(x, 5.0), x_T.double(), progress=False)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-9)


def test_registry_and_config():
    schedule = NoiseSchedule("linear", 100)
    assert {"ddim", "ddpm"} <= set(available_samplers())
    sampler = build_sampler("ddim", schedule, num_steps=10, eta=0.5)
    assert isinstance(sampler, DDIMSampler) and isinstance(sampler, Sampler) and sampler.eta == 0.5
    assert isinstance(build_sampler("ddpm", schedule, variance="beta"), DDPMSampler)
    with pytest.raises(ValueError, match="ddim.*ddpm"):
        build_sampler("plms", schedule)
    built = instantiate_from_config(
        {"target": "ldm.diffusion.DDIMSampler", "params": {"num_steps": 25, "eta": 0.0}}, schedule=schedule
    )
    assert built.num_model_evaluations == 25


def test_bad_inputs():
    schedule = NoiseSchedule("linear", 100)
    for bad in (0, 101, -1, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            DDIMSampler(schedule, num_steps=bad)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(schedule, 10, eta=-0.1)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(schedule, 10, eta=3.0)
    with pytest.raises(ValueError, match="eps, x0, v"):
        DDIMSampler(schedule, 10, parameterization="epsilon")
    with pytest.raises(ValueError, match="eps, x0, v"):
        DDPMSampler(schedule, parameterization="score")
    with pytest.raises(ValueError, match="beta_tilde"):
        DDPMSampler(schedule, variance="learned")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMSampler(schedule, 10, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="trailing"):
        DDIMSampler(schedule, 100)  # leading + offset 1 would reach t = 100
    with pytest.raises(ValueError, match="clip_denoised"):
        DDIMSampler(schedule, 10, clip_denoised=-1.0)
    sampler = DDIMSampler(schedule, 10)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(lambda x, t, c: x[:, :1], torch.randn(2, 3), progress=False)
    with pytest.raises(ValueError, match="floating"):
        sampler.sample(lambda x, t, c: x, torch.zeros(2, 3, dtype=torch.long), progress=False)
