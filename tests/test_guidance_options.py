"""Guidance rescale (Lin et al. 2023) and guidance in a limited interval (Kynkäänniemi et al. 2024): the math
against diffusers and closed forms, which network calls are made, every sampler taking the options, the flags."""

import math

import pytest
import torch

from ldm.diffusion import NoiseSchedule, build_sampler, classifier_free_guidance, ddim_step
from ldm.diffusion.guidance import (
    check_guidance_interval,
    in_guidance_interval,
    rescale_guidance,
    with_guidance_options,
)
from ldm.diffusion.samplers import SAMPLERS


class RecordingModel:
    """``out = x (1 + mean(cond)) + sin(t / 100) + mean(cond)`` per sample; records each call's batch size, timesteps
    and which conditionings (by their first value) it saw."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        assert t.shape == (x.shape[0],) and cond.shape[0] == x.shape[0]
        self.calls.append({"rows": x.shape[0], "t": t.clone(), "cond_first": cond[:, 0].tolist()})
        m = cond.mean(dim=1).view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return x * (1 + m) + torch.sin(t.to(x.dtype) / 100).view(-1, *([1] * (x.ndim - 1))) + m


def _pair(batch=2, width=5):
    cond = torch.randn(batch, width, dtype=torch.float64) + 2.0  # never 0: tells cond rows from uncond rows
    uncond = torch.zeros(batch, width, dtype=torch.float64)
    return cond, uncond


# -- rescale --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_equals_diffusers_rescale_noise_cfg(phi):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    generator = torch.Generator().manual_seed(1)
    # per-sample stds that differ a lot, so a batch-wide std would give another answer
    scales = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64).view(3, 1, 1, 1)
    guided = torch.randn(3, 4, 6, 6, generator=generator, dtype=torch.float64) * scales + 0.3
    cond = torch.randn(3, 4, 6, 6, generator=generator, dtype=torch.float64)
    ours = rescale_guidance(guided, cond, phi)
    theirs = rescale_noise_cfg(guided.clone(), cond.clone(), guidance_rescale=phi)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)


def test_rescale_closed_form_phi_one_matches_the_conditional_std():
    guided = torch.randn(4, 3, 8, 8, dtype=torch.float64) * 5 + 1
    cond = torch.randn(4, 3, 8, 8, dtype=torch.float64) * torch.tensor([0.5, 1, 2, 3], dtype=torch.float64).view(4, 1, 1, 1)
    out = rescale_guidance(guided, cond, 1.0)
    for k in range(4):  # eq. 15 alone: std(out_k) = std(cond_k), and out_k is guided_k times a positive number
        assert math.isclose(out[k].std().item(), cond[k].std().item(), rel_tol=1e-12)
        ratio = out[k] / guided[k]
        torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.flatten()[0].item()), rtol=1e-12, atol=0)
    half = rescale_guidance(guided, cond, 0.5)  # eq. 16: the midpoint of plain and rescaled
    torch.testing.assert_close(half, 0.5 * (out + guided), rtol=1e-12, atol=1e-12)


def test_rescale_keeps_dtype_and_a_constant_output():
    guided = torch.randn(2, 4, 4, 4).to(torch.bfloat16)
    cond = torch.randn(2, 4, 4, 4).to(torch.bfloat16)
    assert rescale_guidance(guided, cond, 0.7).dtype == torch.bfloat16
    constant = torch.full((2, 3, 4), 2.0, dtype=torch.float64)  # std 0: no finite rescaling, left as it is
    torch.testing.assert_close(rescale_guidance(constant, torch.randn(2, 3, 4, dtype=torch.float64), 1.0), constant)


def test_phi_zero_is_plain_guidance_and_phi_changes_the_wrapper_output():
    model = RecordingModel()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    t = torch.tensor([500, 500])
    cond, uncond = _pair()
    out_c, out_u = model(x, t, cond), model(x, t, uncond)
    plain = out_u + 7.5 * (out_c - out_u)
    torch.testing.assert_close(classifier_free_guidance(model, 7.5, rescale=0.0)(x, t, (cond, uncond)), plain,
                               rtol=1e-12, atol=1e-12)
    rescaled = classifier_free_guidance(model, 7.5, rescale=0.7)(x, t, (cond, uncond))
    torch.testing.assert_close(rescaled, rescale_guidance(plain, out_c, 0.7), rtol=1e-12, atol=1e-12)
    assert (rescaled - plain).abs().max() > 1e-3


# -- interval -------------------------------------------------------------------------------------------------------


def test_interval_is_half_open_in_sigma():
    sigma = torch.tensor([0.1, 0.2, 0.3, 5.0, 5.0001, math.inf], dtype=torch.float64)
    assert in_guidance_interval(sigma, (0.2, 5.0)).tolist() == [False, False, True, True, False, False]
    assert in_guidance_interval(sigma, (0.2, math.inf)).tolist() == [False, False, True, True, True, True]
    assert in_guidance_interval(sigma, None).all()


def test_interval_outside_is_the_conditional_model_in_one_call_inside_is_plain_guidance():
    model = RecordingModel()
    band = (1.0, 10.0)
    sigma_of_t = lambda t: t.to(torch.float64) / 100  # noqa: E731  (a stand-in map: t = 500 -> sigma 5)
    guided = classifier_free_guidance(model, 5.0, interval=band, sigma_of_t=sigma_of_t)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    cond, uncond = _pair(3)

    t_out = torch.full((3,), 50)  # sigma 0.5: outside
    out_c = model(x, t_out, cond)
    model.calls.clear()
    out = guided(x, t_out, (cond, uncond))
    assert [c["rows"] for c in model.calls] == [3]  # B rows: the unconditional branch is not evaluated
    assert all(v != 0 for v in model.calls[0]["cond_first"])
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)

    t_in = torch.full((3,), 500)  # sigma 5: inside
    out_c, out_u = model(x, t_in, cond), model(x, t_in, uncond)
    model.calls.clear()
    out = guided(x, t_in, (cond, uncond))
    assert [c["rows"] for c in model.calls] == [6]
    torch.testing.assert_close(out, out_u + 5.0 * (out_c - out_u), rtol=1e-12, atol=1e-12)

    t_mixed = torch.tensor([50, 500, 2000])  # out, in, out (above the band)
    out = guided(x, t_mixed, (cond, uncond))
    expected_c, expected_u = model(x, t_mixed, cond), model(x, t_mixed, uncond)
    expected = torch.stack([expected_c[0], (expected_u + 5 * (expected_c - expected_u))[1], expected_c[2]])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def _ddim_reference(model, schedule, timesteps, x_T, cond, uncond, scale, band, phi=0.0):
    """DDIM (eta 0, trailing, CompVis's last step to abar_0) written out step by step, with the interval rule and
    rescale applied by hand: the independent loop the sampler's guided run must equal."""
    a = schedule.alphas_cumprod.double()
    x = x_T
    for k, t in enumerate(timesteps):
        abar = a[t]
        abar_prev = a[timesteps[k + 1]] if k + 1 < len(timesteps) else a[0]
        sigma = math.sqrt((1 - abar) / abar)
        tt = torch.full((x.shape[0],), t)
        out_c = model(x, tt, cond)
        if band[0] < sigma <= band[1]:
            out_u = model(x, tt, uncond)
            out = out_u + scale * (out_c - out_u)
            if phi:
                out = rescale_guidance(out, out_c, phi)
        else:
            out = out_c
        eps = out  # eps-parameterization
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        x = ddim_step(x, x0, eps, abar, abar_prev)
    return x


def test_ddim_with_interval_and_rescale_equals_a_hand_written_loop_and_skips_uncond_calls():
    schedule = NoiseSchedule("cosine", 1000)
    band = (0.5, 5.0)
    sampler = build_sampler("ddim", schedule, num_steps=12, timestep_spacing="trailing", guidance_interval=band,
                            guidance_rescale=0.7)
    sigmas = sampler.step_sigmas
    inside = [(band[0] < s <= band[1]) for s in sigmas.tolist()]
    assert 0 < sum(inside) < len(inside) and sampler.guided_steps == sum(inside)
    model = RecordingModel()
    cond, uncond = _pair(2)
    x_T = torch.randn(2, 3, 4, dtype=torch.float64)
    out = sampler.sample(classifier_free_guidance(model, 4.0), x_T, cond=(cond, uncond), progress=False)
    rows = [c["rows"] for c in model.calls]
    assert rows == [4 if i else 2 for i in inside]  # one call per step: 2B rows inside the band, B outside
    model.calls.clear()
    expected = _ddim_reference(model, schedule, sampler.timesteps.tolist(), x_T, cond, uncond, 4.0, band, phi=0.7)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_takes_the_options(name):
    schedule = NoiseSchedule("cosine", 1000)
    steps = {} if name == "ddpm" else {"num_steps": 6}
    if name == "ddpm":
        steps = {"num_steps": 6}
    plain = build_sampler(name, schedule, **steps)
    band = (float(plain.step_sigmas[3]) * 0.999, float(plain.step_sigmas[1]) * 1.001)  # steps 1..3
    sampler = build_sampler(name, schedule, guidance_interval=band, guidance_rescale=0.5, **steps)
    assert sampler.guided_steps == 3
    model = RecordingModel()
    cond, uncond = _pair(2)
    x_T = torch.randn(2, 2, 3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    out = sampler.sample(classifier_free_guidance(model, 3.0), x_T, cond=(cond, uncond), generator=generator,
                         progress=False)
    assert torch.isfinite(out).all()
    rows = [c["rows"] for c in model.calls]
    assert len(rows) == sampler.num_model_evaluations and set(rows) == {2, 4}
    for call in model.calls:  # each call guided exactly when its own noise level lies in the band
        sigma = float(sampler.sigma_at(call["t"][:1])[0])
        assert (call["rows"] == 4) == (band[0] < sigma <= band[1]), (sigma, call["rows"])


def test_options_leave_an_unguided_model_fn_unchanged():
    schedule = NoiseSchedule("cosine", 1000)
    model = RecordingModel()
    cond, _ = _pair(2)
    x_T = torch.randn(2, 3, 4, dtype=torch.float64)
    plain = build_sampler("ddim", schedule, num_steps=5).sample(model, x_T, cond=cond, progress=False)
    with_options = build_sampler("ddim", schedule, num_steps=5, guidance_rescale=0.7, guidance_interval=[0.1, 3])
    torch.testing.assert_close(with_options.sample(model, x_T, cond=cond, progress=False), plain, rtol=0, atol=0)


def test_interval_sigma_of_fractional_karras_timesteps():
    schedule = NoiseSchedule("scaled_linear", 1000)
    sampler = build_sampler("heun", schedule, num_steps=8)  # karras spacing: fractional t
    assert sampler.timesteps.is_floating_point()
    torch.testing.assert_close(sampler.sigma_at(sampler.timesteps), sampler.step_sigmas, rtol=1e-9, atol=0)
    integer = build_sampler("ddim", schedule, num_steps=8)
    a = schedule.alphas_cumprod.double()[integer.timesteps]
    torch.testing.assert_close(integer.sigma_at(integer.timesteps), ((1 - a) / a).sqrt(), rtol=0, atol=0)


# -- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phi", [-0.1, 1.5, "0.7", True, float("nan")])
def test_invalid_rescale_is_refused(phi):
    with pytest.raises(ValueError, match=r"guidance_rescale .*\[0, 1\]"):
        build_sampler("ddim", NoiseSchedule("cosine", 1000), num_steps=5, guidance_rescale=phi)


@pytest.mark.parametrize("band", [(5.0, 1.0), (1.0, 1.0), (-1.0, 2.0), (float("nan"), 1.0), (1.0,), "0 5",
                                  (float("inf"), float("inf")), (True, 3.0)])
def test_invalid_interval_is_refused(band):
    with pytest.raises(ValueError, match="guidance_interval"):
        check_guidance_interval(band)


def test_a_band_holding_no_step_names_the_grid_and_the_unit():
    with pytest.raises(ValueError, match=r"holds none of the 10 noise levels .* not in timesteps"):
        build_sampler("ddim", NoiseSchedule("scaled_linear", 1000), num_steps=10, guidance_interval=[200, 800])


def test_options_given_twice_are_refused():
    model = RecordingModel()
    already = classifier_free_guidance(model, 3.0, rescale=0.5)
    with pytest.raises(ValueError, match="given twice"):
        with_guidance_options(already, rescale=0.7)
    with pytest.raises(ValueError, match="sigma_of_t"):
        classifier_free_guidance(model, 3.0, interval=(0.1, 1.0))


# -- the flags ------------------------------------------------------------------------------------------------------


def test_txt2img_and_evaluate_flags_become_sampler_spec_keys():
    from ldm.cli import evaluate, txt2img

    args = txt2img.parse_args(["--prompt", "a red circle", "--guidance-rescale", "0.7",
                               "--guidance-interval", "0.3", "inf"])
    spec = txt2img.sampler_settings(args)
    assert spec["guidance_rescale"] == 0.7 and spec["guidance_interval"] == [0.3, math.inf]
    assert "guidance_rescale" not in txt2img.sampler_settings(txt2img.parse_args(["--prompt", "x"]))
    sampler = build_sampler(spec.pop("name"), NoiseSchedule("cosine", 1000), **spec)
    assert sampler.guidance_rescale == 0.7 and sampler.guidance_interval == (0.3, math.inf)
    eargs = evaluate.parse_args(["--guidance-interval", "1", "2"])
    assert evaluate.sampler_spec("ddim", 50, 0.0, eargs)["guidance_interval"] == [1.0, 2.0]


def test_txt2img_end_to_end_writes_the_options_and_refuses_bad_ones(trained, tmp_path):
    import json

    from PIL import Image

    from ldm.cli import txt2img

    weights, _ = trained
    common = ["--prompt", "a red circle", "--ckpt", weights, "--steps", "3", "--no-progress", "--seed", "1"]
    plain = txt2img.main(common + ["--outdir", str(tmp_path / "plain")])[0]
    banded = txt2img.main(common + ["--outdir", str(tmp_path / "band"), "--guidance-rescale", "0.7",
                                    "--guidance-interval", "0", "inf"])[0]
    meta = json.loads(Image.open(banded).text["parameters"])
    assert meta["guidance_rescale"] == 0.7 and meta["guidance_interval"][0] == 0
    assert Image.open(plain).tobytes() != Image.open(banded).tobytes()  # rescale changed the image
    with pytest.raises(SystemExit, match="guidance_rescale"):
        txt2img.main(common + ["--outdir", str(tmp_path / "bad"), "--guidance-rescale", "2"])
    with pytest.raises(SystemExit, match="not in timesteps"):
        txt2img.main(common + ["--outdir", str(tmp_path / "bad"), "--guidance-interval", "1e9", "1e10"])
