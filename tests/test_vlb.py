"""The variational bound for Gaussian data x0 ~ N(m, s^2 I), where the optimal model and every KL are closed form.

Identity used: E_x0[bound] = H(data) + KL(q(x_T) || N(0, I)) + sum_t E KL(q(x_{t-1} | x_t) || p(x_{t-1} | x_t)).
With the optimal mean, the true reverse q(x_{t-1} | x_t) = N(model mean, v*_t) with
v*_t = beta~_t + c1_t^2 Var[x0 | x_t], Var[x0 | x_t] = s^2 (1 - abar_t) / (abar_t s^2 + 1 - abar_t), so each KL is
0.5 (v*/sigma^2 - 1 - log(v*/sigma^2)). For s = 1 and sigma_t^2 = beta_t, v*_t = beta_t exactly: the bound equals
the data entropy up to the (tiny) prior term.
"""

import math

import pytest
import torch

from ldm.diffusion import NoiseSchedule, nats_to_bits_per_dim, prior_kl, variational_bound
from ldm.diffusion.gaussian import discretized_gaussian_log_likelihood


def optimal_model(schedule, m, s, parameterization="eps"):
    a = schedule.alphas_cumprod
    V = a * s**2 + 1 - a
    tables = {"sqrt_a": a.sqrt(), "sqrt_1ma": (1 - a).sqrt(), "eps": (1 - a).sqrt() / V, "x0": a.sqrt() * s**2 / V}

    def model_fn(x, t, cond):
        c = {k: v[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1))) for k, v in tables.items()}
        d = x - c["sqrt_a"] * m
        eps, x0 = c["eps"] * d, m + c["x0"] * d
        return {"eps": eps, "x0": x0, "v": c["sqrt_a"] * eps - c["sqrt_1ma"] * x0}[parameterization]

    return model_fn


def closed_form_gap(schedule, m, s, variance):
    """Per-dim E[bound] - H(data) in nats (see module docstring), from float64 scalars."""
    betas = schedule.betas.tolist()
    abar, total = [], 1.0
    for b in betas:
        total *= 1 - b
        abar.append(total)
    T = len(betas)

    def kl_var(v_true, v_model):
        r = v_true / v_model
        return 0.5 * (r - 1 - math.log(r))

    def var_x0_given_xt(a):
        return s**2 * (1 - a) / (a * s**2 + 1 - a)

    gap = 0.0
    for t in range(1, T):
        a, ap, b = abar[t], abar[t - 1], betas[t]
        c1 = math.sqrt(ap) * b / (1 - a)
        bt = b * (1 - ap) / (1 - a)
        gap += kl_var(bt + c1**2 * var_x0_given_xt(a), bt if variance == "beta_tilde" else b)
    bt1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    gap += kl_var(var_x0_given_xt(abar[0]), bt1 if variance == "beta_tilde" else betas[0])
    aT = abar[-1]
    vT, muT = aT * s**2 + 1 - aT, math.sqrt(aT) * m
    gap += 0.5 * (vT + muT**2 - 1 - math.log(vT))
    return gap


def data_nll(x0, m, s):
    """-log N(x0; m, s^2 I) per sample [B]."""
    return (0.5 * math.log(2 * math.pi * s**2) + (x0 - m) ** 2 / (2 * s**2)).reshape(x0.shape[0], -1).sum(1)


def check_bound(bound, x0, m, s, expected_gap_per_dim, n_se=4.5):
    D = x0[0].numel()
    diff = bound.total - data_nll(x0, m, s)
    se = diff.std().item() / math.sqrt(diff.numel())
    print(f"bound - nll: {diff.mean().item():.4f}, closed-form gap {D * expected_gap_per_dim:.4f}, se {se:.4f}")
    assert abs(diff.mean().item() - D * expected_gap_per_dim) < n_se * se + 1e-6, (
        diff.mean().item(),
        D * expected_gap_per_dim,
        se,
    )
    return se


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_bound_equals_nll_for_unit_variance_data(parameterization):
    schedule = NoiseSchedule("linear", 1000)
    m, s, B, D = 1.5, 1.0, 3000, 2
    gen = torch.Generator().manual_seed(0)
    x0 = m + s * torch.randn(B, D, generator=gen, dtype=torch.float64)
    bound = variational_bound(
        optimal_model(schedule, m, s, parameterization), schedule, x0, parameterization=parameterization,
        variance="beta", generator=gen,
    )
    assert bound.terms.shape == (B, 1000) and bound.prior.shape == (B,) and bound.total.shape == (B,)
    torch.testing.assert_close(bound.total, bound.prior + bound.terms.sum(1))
    torch.testing.assert_close(bound.decoder, bound.terms[:, 0])
    assert bound.kl_terms.shape == (B, 999) and bool((bound.kl_terms >= 0).all())
    gap = closed_form_gap(schedule, m, s, "beta")
    assert 0 < gap < 1e-4  # only the prior term: abar_T m^2 / 2
    check_bound(bound, x0, m, s, gap)
    # the bound is close to the true negative log-likelihood of the data, 0.5 log(2 pi e s^2) per dim
    entropy = D * 0.5 * math.log(2 * math.pi * math.e * s**2)
    se = bound.total.std().item() / math.sqrt(B)
    assert se < 0.05
    assert abs(bound.total.mean().item() - entropy) < 4.5 * se


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_bound_matches_closed_form_gap(variance):
    schedule = NoiseSchedule("linear", 1000)
    m, s, B = -0.7, 0.4, 3000
    gen = torch.Generator().manual_seed(1)
    x0 = m + s * torch.randn(B, 1, generator=gen, dtype=torch.float64)
    bound = variational_bound(optimal_model(schedule, m, s), schedule, x0, variance=variance, generator=gen)
    gap = closed_form_gap(schedule, m, s, variance)
    check_bound(bound, x0, m, s, gap)
    # the gap is the price of a fixed reverse variance; small on DDPM's fine 1000-step schedule
    assert gap > 0


def test_individual_terms():
    schedule = NoiseSchedule("linear", 1000)
    m, s, B = 0.3, 0.6, 4000
    gen = torch.Generator().manual_seed(2)
    x0 = m + s * torch.randn(B, 1, generator=gen, dtype=torch.float64)
    bound = variational_bound(optimal_model(schedule, m, s), schedule, x0, variance="beta_tilde", generator=gen)
    abar = schedule.alphas_cumprod.tolist()
    betas = schedule.betas.tolist()
    for t in (1, 5, 100, 700):
        a, ap, b = abar[t], abar[t - 1], betas[t]
        c1 = math.sqrt(ap) * b / (1 - a)
        bt = b * (1 - ap) / (1 - a)
        # E KL(q(x_{t-1} | x_t, x0) || N(model mean, bt)) = c1^2 E[(x0 - E[x0|x_t])^2] / (2 bt)
        expected = c1**2 * s**2 * (1 - a) / (a * s**2 + 1 - a) / (2 * bt)
        term = bound.terms[:, t]
        se = term.std().item() / math.sqrt(B)
        assert abs(term.mean().item() - expected) < 4.5 * se, (t, term.mean().item(), expected)
    # prior term per sample is the closed-form KL(N(sqrt(aT) x0, 1 - aT) || N(0, 1))
    aT = abar[-1]
    expected_prior = 0.5 * (1 - aT + aT * x0[:, 0] ** 2 - 1 - math.log(1 - aT))
    torch.testing.assert_close(bound.prior, expected_prior, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(prior_kl(schedule, x0), expected_prior, rtol=1e-9, atol=1e-12)


def test_bits_per_dim():
    nats = torch.tensor([math.log(2) * 3 * 12.0])
    torch.testing.assert_close(nats_to_bits_per_dim(nats, 3), torch.tensor([12.0]))
    schedule = NoiseSchedule("linear", 50)
    x0 = torch.randn(4, 2, 3, dtype=torch.float64)
    bound = variational_bound(lambda x, t, c: torch.zeros_like(x), schedule, x0)
    torch.testing.assert_close(bound.bits_per_dim(), bound.total / (6 * math.log(2)))


def test_discretized_decoder_is_a_distribution_over_256_bins():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, math.log(0.05)), (-0.98, math.log(0.3)), (0.7, math.log(0.004))):
        logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), log_scale)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        # an interior bin is the Gaussian mass between its edges
        k = min(max(round((mean + 1) * 127.5) + 1, 1), 254)
        x, w, sd = levels[k].item(), 1 / 255, math.exp(log_scale)
        phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
        assert logp[k].exp().item() == pytest.approx(phi((x + w - mean) / sd) - phi((x - w - mean) / sd), rel=1e-6)
    schedule = NoiseSchedule("linear", 100)
    x0 = levels[torch.randint(0, 256, (8, 3))]
    bound = variational_bound(lambda x, t, c: torch.zeros_like(x), schedule, x0, decoder="discretized")
    assert torch.isfinite(bound.total).all() and bool((bound.decoder >= 0).all())


def test_bad_inputs():
    schedule = NoiseSchedule("linear", 10)
    x0 = torch.randn(2, 3)
    model = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="beta_tilde"):
        variational_bound(model, schedule, x0, variance="learned")
    with pytest.raises(ValueError, match="gaussian"):
        variational_bound(model, schedule, x0, decoder="logistic")
    with pytest.raises(ValueError, match="eps, x0, v"):
        variational_bound(model, schedule, x0, parameterization="score")
    with pytest.raises(ValueError):
        variational_bound(model, schedule, torch.zeros(2, 3, dtype=torch.long))
