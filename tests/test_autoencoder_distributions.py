"""DiagonalGaussianDistribution: closed-form KL vs Monte Carlo, reparameterized gradients, NLL vs torch.distributions."""

import math

import pytest
import torch

from autoencoder import DiagonalGaussianDistribution


def _moments(batch=3, channels=2, h=2, w=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, channels, h, w, generator=g, dtype=dtype)
    logvar = torch.randn(batch, channels, h, w, generator=g, dtype=dtype) * 0.5
    return torch.cat([mean, logvar], dim=1), mean, logvar


def test_kl_to_standard_normal_matches_monte_carlo():
    params, mean, logvar = _moments()
    dist = DiagonalGaussianDistribution(params)
    kl = dist.kl()
    assert kl.shape == (3,)
    # Monte Carlo: E_q[log q(z) - log p(z)], summed over the non-batch dims
    g = torch.Generator().manual_seed(1)
    n = 200_000
    std = torch.exp(0.5 * logvar)
    z = mean + std * torch.randn((n,) + mean.shape, generator=g, dtype=torch.float64)
    log_q = -0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 / std**2)
    log_p = -0.5 * (math.log(2 * math.pi) + z**2)
    mc = (log_q - log_p).sum(dim=(2, 3, 4)).mean(dim=0)
    mc_se = (log_q - log_p).sum(dim=(2, 3, 4)).std(dim=0) / math.sqrt(n)
    assert torch.all((kl - mc).abs() < 5 * mc_se + 1e-3), (kl, mc, mc_se)


def test_kl_between_two_gaussians_matches_torch_distributions():
    p1, m1, lv1 = _moments(seed=2)
    p2, m2, lv2 = _moments(seed=3)
    kl = DiagonalGaussianDistribution(p1).kl(DiagonalGaussianDistribution(p2))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)), torch.distributions.Normal(m2, torch.exp(0.5 * lv2))
    ).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl, reference, rtol=1e-10, atol=1e-10)


def test_kl_of_standard_normal_is_zero():
    params = torch.zeros(2, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(DiagonalGaussianDistribution(params).kl(), torch.zeros(2, dtype=torch.float64))


def test_nll_matches_normal_log_prob():
    params, mean, logvar = _moments()
    dist = DiagonalGaussianDistribution(params)
    x = torch.randn_like(mean)
    reference = -torch.distributions.Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(dist.nll(x), reference, rtol=1e-10, atol=1e-10)


def test_sample_statistics_and_generator():
    params, mean, logvar = _moments(batch=1, channels=1, h=1, w=1)
    dist = DiagonalGaussianDistribution(params.expand(100_000, -1, -1, -1))
    z = dist.sample(generator=torch.Generator().manual_seed(0))
    assert abs(z.mean() - mean.item()) < 5 * math.exp(0.5 * logvar.item()) / math.sqrt(100_000)
    assert abs(z.var() / math.exp(logvar.item()) - 1) < 0.02
    a = dist.sample(generator=torch.Generator().manual_seed(5))
    b = dist.sample(generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(dist.mode(), dist.mean)


def test_gradients_flow_through_reparameterized_sample():
    params, _, _ = _moments()
    params.requires_grad_(True)
    dist = DiagonalGaussianDistribution(params)
    eps_gen = torch.Generator().manual_seed(7)
    z = dist.sample(generator=eps_gen)
    z.sum().backward()
    grad_mean, grad_logvar = params.grad.chunk(2, dim=1)
    # d z / d mean = 1 ; d z / d logvar = 0.5 * std * eps = 0.5 * (z - mean)
    torch.testing.assert_close(grad_mean, torch.ones_like(grad_mean))
    torch.testing.assert_close(grad_logvar, 0.5 * (z - dist.mean).detach())
    assert grad_logvar.abs().sum() > 0


def test_logvar_is_clamped_and_deterministic_mode():
    params = torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 100.0)], dim=1)
    assert DiagonalGaussianDistribution(params).logvar.item() == 20.0
    det = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(det.sample(), det.mean)
    assert det.kl().shape == (1,) and det.kl().item() == 0.0


def test_odd_channel_count_is_rejected():
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))
