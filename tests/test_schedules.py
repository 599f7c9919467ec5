"""Beta schedules and the NoiseSchedule tables, against independent float64 loops and the papers' formulas."""

import math

import pytest
import torch

from ldm.diffusion import (
    BETA_SCHEDULES,
    ZERO_TERMINAL_SNR_ALPHA_CUMPROD,
    NoiseSchedule,
    make_beta_schedule,
    rescale_zero_terminal_snr,
)
from ldm.util import instantiate_from_config


def cumprod_loop(betas):
    out, prod = [], 1.0
    for b in betas.tolist():
        prod *= 1.0 - b
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", BETA_SCHEDULES)
def test_alphas_cumprod_is_cumulative_product(kind):
    schedule = NoiseSchedule(kind, 1000)
    for name in NoiseSchedule.TABLES:
        assert getattr(schedule, name).dtype == torch.float64, name
    expected = cumprod_loop(schedule.betas)
    torch.testing.assert_close(schedule.alphas_cumprod, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.alphas, 1 - schedule.betas, rtol=0, atol=0)
    assert schedule.alphas_cumprod_prev[0] == 1.0
    torch.testing.assert_close(schedule.alphas_cumprod_prev[1:], expected[:-1], rtol=1e-12, atol=0)
    # betas increase, abar decreases strictly
    assert bool((schedule.betas[1:] >= schedule.betas[:-1]).all())
    assert bool((schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1]).all())


def test_linear_endpoints_and_spacing():
    betas = make_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert math.isclose(betas[0].item(), 1e-4, rel_tol=1e-12)
    assert math.isclose(betas[-1].item(), 0.02, rel_tol=1e-12)
    steps = betas[1:] - betas[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), rtol=1e-9, atol=1e-15)


def test_scaled_linear_is_linear_in_sqrt_space():
    betas = make_beta_schedule("scaled_linear", 1000)
    root = betas.sqrt()
    assert math.isclose(root[0].item(), math.sqrt(0.00085), rel_tol=1e-12)
    assert math.isclose(root[-1].item(), math.sqrt(0.012), rel_tol=1e-12)
    assert math.isclose(betas[0].item(), 0.00085, rel_tol=1e-12)
    assert math.isclose(betas[-1].item(), 0.012, rel_tol=1e-12)
    steps = root[1:] - root[:-1]
    torch.testing.assert_close(
        steps, torch.full_like(steps, (math.sqrt(0.012) - math.sqrt(0.00085)) / 999), rtol=1e-9, atol=1e-15
    )
    # Stable Diffusion's abar_0 and abar_999 (well-known values of this schedule)
    abar = cumprod_loop(betas)
    assert math.isclose(abar[0].item(), 0.99915, rel_tol=1e-12)
    assert abs(abar[-1].item() - 0.0046) < 1e-4


def test_custom_endpoints():
    betas = make_beta_schedule("linear", 10, beta_start=0.001, beta_end=0.1)
    assert math.isclose(betas[0].item(), 0.001) and math.isclose(betas[-1].item(), 0.1)
    schedule = NoiseSchedule("scaled_linear", 10, beta_start=0.0001, beta_end=0.04)
    assert math.isclose(schedule.betas[0].item(), 0.0001) and math.isclose(schedule.betas[-1].item(), 0.04)


def test_cosine_matches_closed_form_and_clip():
    T, s = 1000, 0.008
    betas = make_beta_schedule("cosine", T)
    assert bool((betas <= 0.999).all()) and bool((betas > 0).all())
    assert betas[-1].item() == pytest.approx(0.999)  # f(1) = cos^2(pi/2) = 0, so the last beta is clipped
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    abar = cumprod_loop(betas)
    for t in (0, 1, 10, 250, 500, 900, 990):
        assert abar[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9), t
    assert bool((betas[1:] >= betas[:-1]).all())


@pytest.mark.parametrize("kind", BETA_SCHEDULES)
def test_zero_terminal_snr_rescale(kind):
    original = make_beta_schedule(kind, 1000)
    rescaled = make_beta_schedule(kind, 1000, rescale_zero_terminal_snr=True)
    torch.testing.assert_close(rescaled, rescale_zero_terminal_snr(original), rtol=0, atol=0)
    abar_old, abar_new = cumprod_loop(original), cumprod_loop(rescaled)
    assert abar_new[-1].item() == 0.0
    assert rescaled[-1].item() == 1.0
    assert abar_new[0].item() == pytest.approx(abar_old[0].item(), rel=1e-12)
    # Algorithm 1: sqrt(abar) is shifted and scaled, i.e. an affine function of the original sqrt(abar)
    r_old, r_new = abar_old.sqrt(), abar_new.sqrt()
    r0, rT = r_old[0].item(), r_old[-1].item()
    torch.testing.assert_close(r_new, (r_old - rT) * r0 / (r0 - rT), rtol=1e-9, atol=1e-12)
    assert bool((abar_new[1:] < abar_new[:-1]).all())


@pytest.mark.parametrize("kind", BETA_SCHEDULES)
def test_noise_schedule_zero_terminal_snr_stores_tiny_positive_abar(kind):
    schedule = NoiseSchedule(kind, 1000, rescale_zero_terminal_snr=True)
    rescaled_abar = cumprod_loop(make_beta_schedule(kind, 1000, rescale_zero_terminal_snr=True))
    abar = schedule.alphas_cumprod
    # documented rule: abar_{T-1} = abar_{T-2}^2 / abar_{T-3}, everything before unchanged
    assert abar[-1].item() == pytest.approx(rescaled_abar[-2].item() ** 2 / rescaled_abar[-3].item(), rel=1e-12)
    torch.testing.assert_close(abar[:-1], rescaled_abar[:-1], rtol=1e-12, atol=0)
    assert 0 < abar[-1].item() < 1e-6 and abar[-1] < abar[-2]
    torch.testing.assert_close(abar, cumprod_loop(schedule.betas), rtol=1e-12, atol=0)
    assert abar[0].item() == pytest.approx(cumprod_loop(make_beta_schedule(kind, 1000))[0].item(), rel=1e-12)
    assert torch.isfinite(schedule.sigmas).all() and torch.isfinite(schedule.posterior_mean_coef1).all()
    assert schedule.snr(torch.tensor([999])).item() < 1e-6


def test_zero_terminal_snr_value_for_stable_diffusion():
    schedule = NoiseSchedule("scaled_linear", 1000, rescale_zero_terminal_snr=True)
    # the constant ComfyUI / A1111 use for Stable Diffusion's rescaled schedule
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(ZERO_TERMINAL_SNR_ALPHA_CUMPROD, rel=1e-7)


def test_posterior_tables_against_loops():
    schedule = NoiseSchedule("linear", 1000)
    betas = schedule.betas.tolist()
    abar = cumprod_loop(schedule.betas).tolist()
    for t in (0, 1, 2, 17, 500, 999):
        a_prev = abar[t - 1] if t > 0 else 1.0
        var = betas[t] * (1 - a_prev) / (1 - abar[t])
        assert schedule.posterior_variance[t].item() == pytest.approx(var, rel=1e-10, abs=1e-300)
        assert schedule.posterior_mean_coef1[t].item() == pytest.approx(
            betas[t] * math.sqrt(a_prev) / (1 - abar[t]), rel=1e-10
        )
        assert schedule.posterior_mean_coef2[t].item() == pytest.approx(
            (1 - a_prev) * math.sqrt(1 - betas[t]) / (1 - abar[t]), rel=1e-10, abs=1e-300
        )
        assert schedule.sqrt_alphas_cumprod[t].item() == pytest.approx(math.sqrt(abar[t]), rel=1e-12)
        assert schedule.sqrt_one_minus_alphas_cumprod[t].item() == pytest.approx(math.sqrt(1 - abar[t]), rel=1e-10)
    assert schedule.posterior_variance[0].item() == 0.0
    # the clipped log variance uses beta~_1 at t = 0 (DDPM's code)
    assert schedule.posterior_log_variance_clipped[0].item() == pytest.approx(
        math.log(schedule.posterior_variance[1].item()), rel=1e-12
    )
    torch.testing.assert_close(
        schedule.posterior_log_variance_clipped[1:], schedule.posterior_variance[1:].log(), rtol=1e-12, atol=0
    )
    abar_t = torch.tensor(abar, dtype=torch.float64)
    torch.testing.assert_close(schedule.snr(torch.arange(1000)), abar_t / (1 - abar_t), rtol=1e-12, atol=0)


def test_tables_stay_float64_and_out_of_state_dict():
    schedule = NoiseSchedule("scaled_linear", 100)
    wrapper = torch.nn.Sequential(torch.nn.Linear(2, 2))
    wrapper.schedule = schedule
    wrapper.half()
    assert wrapper[0].weight.dtype == torch.float16
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert "schedule.alphas_cumprod" not in wrapper.state_dict()
    assert schedule.state_dict() == {}
    assert schedule.num_timesteps == 100


def test_instantiate_from_config():
    schedule = instantiate_from_config(
        {"target": "ldm.diffusion.NoiseSchedule", "params": {"kind": "linear", "num_timesteps": 20}}
    )
    assert isinstance(schedule, NoiseSchedule) and schedule.num_timesteps == 20
    assert schedule.betas[0].item() == pytest.approx(1e-4)


def test_explicit_betas():
    betas = make_beta_schedule("scaled_linear", 50)
    schedule = NoiseSchedule(betas=betas.tolist())
    torch.testing.assert_close(schedule.betas, betas, rtol=0, atol=0)
    assert schedule.kind == "custom"


def test_bad_inputs():
    with pytest.raises(ValueError, match="linear.*scaled_linear.*cosine"):
        make_beta_schedule("quadratic", 1000)
    with pytest.raises(ValueError, match="linear.*scaled_linear.*cosine"):
        NoiseSchedule("sqrt", 1000)
    for bad in (0, 1, -5, 10.5):
        with pytest.raises(ValueError):
            make_beta_schedule("linear", bad)
    with pytest.raises(ValueError):
        make_beta_schedule("linear", 100, beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError):
        make_beta_schedule("linear", 100, beta_end=1.5)
    with pytest.raises(ValueError):
        make_beta_schedule("cosine", 100, beta_start=0.001)
    with pytest.raises(ValueError):
        NoiseSchedule(betas=[0.1, 1.0, 0.2])
    with pytest.raises(ValueError):
        NoiseSchedule(betas=[0.1, -0.1, 0.2])
    with pytest.raises(ValueError):
        NoiseSchedule(betas=[[0.1, 0.2]])
