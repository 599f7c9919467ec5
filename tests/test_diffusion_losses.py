"""The simplified training loss: targets, min-SNR-gamma weights, timestep sampling."""

import math

import pytest
import torch

from ldm.diffusion import NoiseSchedule, diffusion_loss, high_noise_timestep_density, min_snr_weight, sample_timesteps


def test_targets_and_reduction():
    schedule = NoiseSchedule("scaled_linear", 1000)
    x0 = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 250, 600, 999])
    a = schedule.alphas_cumprod[t].view(4, 1, 1, 1)
    x_t_ref = a.sqrt() * x0 + (1 - a).sqrt() * noise
    targets = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}
    for parameterization, target in targets.items():
        seen = {}

        def zero_model(x_t, t_in, cond):
            seen["x_t"], seen["t"], seen["cond"] = x_t, t_in, cond
            return torch.zeros_like(x_t)

        loss = diffusion_loss(zero_model, schedule, x0, "c", parameterization, noise=noise, t=t, reduction="none")
        torch.testing.assert_close(seen["x_t"], x_t_ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(seen["t"], t) and seen["cond"] == "c"
        torch.testing.assert_close(loss, (target**2).mean(dim=(1, 2, 3)), rtol=1e-12, atol=0)
        scalar = diffusion_loss(zero_model, schedule, x0, None, parameterization, noise=noise, t=t)
        assert scalar.ndim == 0
        torch.testing.assert_close(scalar, loss.mean())
        # a model that returns the target has zero loss
        exact = lambda x_t, t_in, cond, target=target: target  # noqa: E731
        assert diffusion_loss(exact, schedule, x0, None, parameterization, noise=noise, t=t).item() < 1e-24


def test_min_snr_weights_equalise_the_implied_x0_error():
    """Hang et al. 2023: eps, x0 and v losses weighted by min-SNR all equal min(SNR, gamma) * |x0 error|^2."""
    schedule = NoiseSchedule("linear", 1000)
    gamma = 5.0
    x0 = torch.randn(5, 16, dtype=torch.float64)
    noise = torch.randn_like(x0)
    delta = 0.1 * torch.randn_like(x0)
    t = torch.tensor([0, 30, 200, 600, 999])
    a = schedule.alphas_cumprod[t].view(5, 1)
    snr = (a / (1 - a)).view(5)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    # the model's prediction implies x0_hat = x0 + delta; express it in each parameterization
    x0_hat = x0 + delta
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    outputs = {"eps": eps_hat, "x0": x0_hat, "v": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat}
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) * (delta**2).mean(dim=1)
    for parameterization, out in outputs.items():
        loss = diffusion_loss(
            lambda x, tt, c, out=out: out, schedule, x0, None, parameterization, min_snr_gamma=gamma, noise=noise,
            t=t, reduction="none",
        )
        torch.testing.assert_close(loss, expected, rtol=1e-8, atol=1e-12)


def test_min_snr_weight_values():
    snr = torch.tensor([0.0, 0.5, 5.0, 100.0], dtype=torch.float64)
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.05], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "x0"), torch.tensor([0.0, 0.5, 5.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(
        min_snr_weight(snr, 5.0, "v"), torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 101], dtype=torch.float64)
    )


def test_timesteps_are_uniform_and_reproducible():
    schedule = NoiseSchedule("linear", 10)
    seen = []

    def model(x_t, t, cond):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    x0 = torch.randn(20_000, 1)
    a = diffusion_loss(model, schedule, x0, generator=torch.Generator().manual_seed(4))
    b = diffusion_loss(model, schedule, x0, generator=torch.Generator().manual_seed(4))
    assert a.item() == b.item()
    counts = torch.bincount(seen[0], minlength=10).double()
    assert counts.numel() == 10 and seen[0].min() >= 0 and seen[0].max() <= 9
    # each of the 10 timesteps ~ Binomial(20000, 0.1): sd ~ 42
    assert (counts - 2000).abs().max().item() < 5 * math.sqrt(20000 * 0.1 * 0.9)


def test_high_noise_band_density_closed_form_and_draws():
    """p(t) = (1 - q) / T + q 1[t >= s] / (T - s): the band {s..T-1} gets q + (1 - q)(T - s)/T of the draws."""
    T, s, q = 20, 15, 0.3
    density = high_noise_timestep_density(T, s, q)
    in_band, below = q / (T - s) + (1 - q) / T, (1 - q) / T
    expected = torch.tensor([below] * s + [in_band] * (T - s), dtype=torch.float64)
    torch.testing.assert_close(density, expected, rtol=1e-15, atol=0)
    assert math.isclose(float(density[s:].sum()), q + (1 - q) * (T - s) / T, rel_tol=1e-12)
    torch.testing.assert_close(high_noise_timestep_density(T, s, 0.0), torch.full((T,), 1 / T, dtype=torch.float64))

    n = 100_000
    t = sample_timesteps(n, T, generator=torch.Generator().manual_seed(7), density=density)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= T - 1
    counts = torch.bincount(t, minlength=T).double()
    sd = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() / sd).max().item() < 5
    again = sample_timesteps(n, T, generator=torch.Generator().manual_seed(7), density=density)
    assert torch.equal(t, again)


@pytest.mark.parametrize(
    "args, message",
    [((10, 10, 0.3), "band_start"), ((10, -1, 0.3), "band_start"), ((10, 5, 1.5), "band_prob"), ((0, 0, 0.1), "num_timesteps")],
)
def test_high_noise_band_density_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        high_noise_timestep_density(*args)
    with pytest.raises(ValueError, match=r"shape \[10\]"):
        sample_timesteps(4, 10, density=torch.ones(9) / 9)


def test_low_precision_inputs():
    schedule = NoiseSchedule("scaled_linear", 1000)
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    loss = diffusion_loss(lambda x, t, c: torch.zeros_like(x), schedule, x0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_bad_inputs():
    schedule = NoiseSchedule("linear", 100)
    x0 = torch.randn(2, 3)
    model = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="eps, x0, v"):
        diffusion_loss(model, schedule, x0, parameterization="epsilon")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion_loss(model, schedule, x0, min_snr_gamma=0)
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(lambda x, t, c: x[:, :1], schedule, x0)
    with pytest.raises(ValueError, match="0..99"):
        diffusion_loss(model, schedule, x0, t=torch.tensor([5, 100]))
    with pytest.raises(ValueError, match="noise"):
        diffusion_loss(model, schedule, x0, noise=torch.randn(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        diffusion_loss(model, schedule, x0, reduction="sum")
