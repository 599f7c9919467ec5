"""Forward process q(x_t | x0), posterior q(x_{t-1} | x_t, x0) and the eps / x0 / v conversions."""

import math

import pytest
import torch

from ldm.diffusion import (
    NoiseSchedule,
    get_v,
    model_output_to_x0_eps,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_posterior_mean_variance,
    q_sample,
)


def test_iterated_single_steps_give_the_closed_form_marginal():
    """Monte Carlo: apply x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z t times (float64), compare the empirical
    mean/variance with q(x_t | x0) = N(sqrt(abar_t) x0, 1 - abar_t) from the schedule."""
    schedule = NoiseSchedule("linear", 1000)
    gen = torch.Generator().manual_seed(1)
    n = 16_000  # n * 2 < 32768 elements: torch keeps elementwise ops single-threaded (fast on shared cores)
    x0 = torch.tensor([1.7, -0.6], dtype=torch.float64)
    x = x0.expand(n, 2).clone()
    checkpoints = {0, 3, 50, 300, 999}
    for t, beta in enumerate(schedule.betas.tolist()):
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        if t in checkpoints:
            mean, var = schedule.q_mean_variance(x0[None], torch.tensor([t]))
            var = var.item()
            se_mean = math.sqrt(var / n)
            se_var = var * math.sqrt(2 / n)
            torch.testing.assert_close(x.mean(0), mean[0], rtol=0, atol=5 * se_mean)
            assert abs(x.var(0) - var).max().item() < 5 * se_var, t
            # and q_sample draws from the same distribution
            t_batch = torch.full((n,), t)
            direct = schedule.q_sample(x0.expand(n, 2), t_batch, generator=gen)
            torch.testing.assert_close(direct.mean(0), mean[0], rtol=0, atol=5 * se_mean)
            assert abs(direct.var(0) - var).max().item() < 5 * se_var


def test_q_sample_formula_and_broadcasting():
    schedule = NoiseSchedule("scaled_linear", 1000)
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    out = schedule.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        a = schedule.alphas_cumprod[ti].item()
        torch.testing.assert_close(out[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i], rtol=1e-12, atol=1e-12)
    # pure function with explicit coefficients
    abar = schedule.alphas_cumprod[t]
    torch.testing.assert_close(q_sample(x0, noise, abar), out, rtol=0, atol=0)
    # low precision input keeps its dtype; coefficients rounded once
    out32 = schedule.q_sample(x0.float(), t, noise.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, out.float(), rtol=1e-6, atol=1e-6)


def _brute_force_posterior(x0, x_t, alpha_t, abar_prev):
    """Mean and variance of p(y | x_t, x0) ∝ N(x_t; sqrt(alpha_t) y, 1 - alpha_t) N(y; sqrt(abar_prev) x0,
    1 - abar_prev), by numeric integration on a grid (float64)."""
    beta_t = 1 - alpha_t
    # the likelihood alone pins y to x_t / sqrt(alpha_t) +- a few sqrt(beta_t / alpha_t)
    center = x_t / math.sqrt(alpha_t)
    width = 30 * math.sqrt(beta_t / alpha_t)
    y = torch.linspace(center - width, center + width, 32_001, dtype=torch.float64)
    log_lik = -0.5 * (x_t - math.sqrt(alpha_t) * y) ** 2 / beta_t
    log_prior = -0.5 * (y - math.sqrt(abar_prev) * x0) ** 2 / (1 - abar_prev)
    log_w = log_lik + log_prior
    w = torch.exp(log_w - log_w.max())
    w = w / w.sum()
    mean = (w * y).sum().item()
    var = (w * (y - mean) ** 2).sum().item()
    return mean, var


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_posterior_equals_bayes_rule_on_a_grid(kind):
    schedule = NoiseSchedule(kind, 1000)
    x0 = torch.tensor([0.8, -1.3, 0.1, 2.0], dtype=torch.float64)
    x_t = torch.tensor([0.5, 0.2, -1.1, 1.4], dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 998])
    mean, var, log_var = schedule.q_posterior(x0, x_t, t)
    assert mean.shape == (4,) and var.shape == (4,)
    for i, ti in enumerate(t.tolist()):
        alpha_t = 1 - schedule.betas[ti].item()
        abar_prev = math.prod(1 - b for b in schedule.betas[:ti].tolist())
        m_ref, v_ref = _brute_force_posterior(x0[i].item(), x_t[i].item(), alpha_t, abar_prev)
        assert mean[i].item() == pytest.approx(m_ref, rel=1e-7, abs=1e-9), ti
        assert var[i].item() == pytest.approx(v_ref, rel=1e-6), ti
        assert log_var[i].item() == pytest.approx(math.log(v_ref), abs=1e-6)
    # the pure function agrees and is exact at t = 0: a point mass at x0 (beta~_0 = 0)
    pm, pv, _ = q_posterior_mean_variance(x0, x_t, schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t])
    torch.testing.assert_close(pm, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pv, var, rtol=1e-12, atol=0)
    m0, v0, _ = schedule.q_posterior(x0, x_t, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(m0, x0, rtol=0, atol=1e-11)
    assert bool((v0 == 0).all())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_parameterization_conversions_round_trip(dtype, tol):
    schedule = NoiseSchedule("scaled_linear", 1000)
    B = 5
    x0 = torch.randn(B, 3, 4, 4, dtype=dtype)
    eps = torch.randn(B, 3, 4, 4, dtype=dtype)
    t = torch.tensor([0, 10, 300, 700, 999])
    a = schedule.alphas_cumprod[t].view(B, 1, 1, 1)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(dtype)
    v_ref = (a.sqrt() * eps - (1 - a).sqrt() * x0).to(dtype)  # definition, Salimans & Ho 2022

    v = schedule.get_v(x0, eps, t)
    assert v.dtype == dtype
    torch.testing.assert_close(v, v_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(schedule.predict_x0_from_eps(x_t, t, eps), x0, rtol=tol, atol=tol * 30)
    torch.testing.assert_close(schedule.predict_eps_from_x0(x_t, t, x0), eps, rtol=tol, atol=tol * 30)
    torch.testing.assert_close(schedule.predict_x0_from_v(x_t, t, v), x0, rtol=tol, atol=tol)
    torch.testing.assert_close(schedule.predict_eps_from_v(x_t, t, v), eps, rtol=tol, atol=tol)
    for parameterization, output in (("eps", eps), ("x0", x0), ("v", v)):
        px0, peps = schedule.model_output_to_x0_eps(output, x_t, t, parameterization)
        torch.testing.assert_close(px0, x0, rtol=tol, atol=tol * 30)
        torch.testing.assert_close(peps, eps, rtol=tol, atol=tol * 30)
        torch.testing.assert_close(schedule.training_target(x0, eps, t, parameterization), output)
    # pure functions with explicit coefficients
    abar = schedule.alphas_cumprod[t]
    torch.testing.assert_close(get_v(x0, eps, abar), v, rtol=0, atol=0)
    torch.testing.assert_close(predict_x0_from_v(x_t, v, abar), schedule.predict_x0_from_v(x_t, t, v))
    torch.testing.assert_close(predict_eps_from_v(x_t, v, abar), schedule.predict_eps_from_v(x_t, t, v))
    torch.testing.assert_close(predict_x0_from_eps(x_t, eps, abar), schedule.predict_x0_from_eps(x_t, t, eps))
    torch.testing.assert_close(predict_eps_from_x0(x_t, x0, abar), schedule.predict_eps_from_x0(x_t, t, x0))
    torch.testing.assert_close(model_output_to_x0_eps(v, x_t, abar, "v")[0], x0, rtol=tol, atol=tol)


def test_v_parameterization_is_finite_at_zero_terminal_snr():
    schedule = NoiseSchedule("scaled_linear", 1000, rescale_zero_terminal_snr=True)
    x0 = torch.randn(4, 8, dtype=torch.float64)
    eps = torch.randn(4, 8, dtype=torch.float64)
    t = torch.full((4,), 999)
    x_t = schedule.q_sample(x0, t, eps)
    v = schedule.get_v(x0, eps, t)
    # at SNR ~ 0, x_t ~ eps and v ~ -x0: the v conversions are well conditioned
    torch.testing.assert_close(schedule.predict_x0_from_v(x_t, t, v), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(v, -x0, rtol=0, atol=1e-3)


def test_snr():
    schedule = NoiseSchedule("cosine", 100)
    t = torch.tensor([0, 50, 99])
    a = schedule.alphas_cumprod[t]
    torch.testing.assert_close(schedule.snr(t), a / (1 - a), rtol=1e-12, atol=0)
    assert schedule.snr(t).dtype == torch.float64


def test_bad_inputs():
    schedule = NoiseSchedule("linear", 100)
    x0 = torch.randn(2, 3)
    with pytest.raises(ValueError, match="0..99"):
        schedule.q_sample(x0, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="0..99"):
        schedule.q_sample(x0, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="integer"):
        schedule.q_sample(x0, torch.tensor([0.5, 3.0]))
    with pytest.raises(ValueError, match="batch"):
        schedule.q_sample(x0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError):
        schedule.q_sample(x0, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="broadcast"):
        schedule.q_sample(x0, torch.tensor([1, 2]), torch.randn(2, 4))
    with pytest.raises(ValueError, match="broadcast"):
        schedule.q_posterior(x0, torch.randn(2, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="eps, x0, v"):
        schedule.model_output_to_x0_eps(x0, x0, torch.tensor([1, 2]), "score")
    with pytest.raises(ValueError, match="shape"):
        schedule.model_output_to_x0_eps(torch.randn(2, 4), x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        q_sample(x0, torch.randn(2, 3), torch.tensor([0.5, 0.5, 0.5]))


def test_matched_filter_snr_against_monte_carlo():
    """x_t = sqrt(a) s + sqrt(1-a) eps; the detector <x_t, s>/||s|| has mean^2 / variance = a ||s||^2 / (1-a)."""
    from ldm.diffusion import matched_filter_snr

    g = torch.Generator().manual_seed(0)
    signal = torch.randn(4, 8, 8, generator=g, dtype=torch.float64) * 0.3
    a = 0.02
    x_t = a**0.5 * signal + (1 - a) ** 0.5 * torch.randn(50_000, 4, 8, 8, generator=g, dtype=torch.float64)
    statistic = (x_t * signal).flatten(1).sum(1) / signal.norm()
    empirical = float(statistic.mean() ** 2 / statistic.var())
    expected = matched_filter_snr(signal, a)
    assert expected == pytest.approx(a * float(signal.pow(2).sum()) / (1 - a))
    assert empirical == pytest.approx(expected, rel=0.05)


def test_layout_leak_script_on_the_shipped_autoencoder():
    """The README's numbers: SD's schedule leaves an object visible at t = T (SNR > 1), cosine does not."""
    from ldm.assets import DEMO_CHECKPOINT
    from ldm.diffusion import matched_filter_snr
    from ldm.models.latent_diffusion import LatentDiffusion
    from scripts import layout_leak

    result = layout_leak.main([])
    table = result["snr_at_T"]
    assert table[("scaled_linear (SD)", "small")] > 1 and table[("scaled_linear (SD)", "large")] > 1
    assert table[("cosine", "small")] < 1e-4 and table[("cosine", "large")] < 1e-4
    # Under cosine an object stays visible until late: the band the shapes configs oversample starts below
    # these steps. Each boundary is checked against matched_filter_snr at that step and the one before it.
    hidden = result["hidden_from"]
    assert hidden[("scaled_linear (SD)", "large", 1.0)] is None
    model = LatentDiffusion.from_checkpoint(DEMO_CHECKPOINT).eval()
    abar = NoiseSchedule(kind="cosine", num_timesteps=1000).alphas_cumprod
    for size in ("small", "large"):
        footprints = layout_leak.object_footprints(model, size)
        for threshold in (4.0, 1.0):
            t = hidden[("cosine", size, threshold)]
            assert 900 < t < 1000

            def mean_snr(step):
                return sum(matched_filter_snr(f, float(abar[step])) for f in footprints) / len(footprints)

            assert mean_snr(t - 1) >= threshold > mean_snr(t)
        assert table[("cosine", size)] == pytest.approx(mean_snr(999), rel=1e-9)
        assert hidden[("cosine", size, 4.0)] < hidden[("cosine", size, 1.0)]
