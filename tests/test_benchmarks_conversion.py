"""Our UNet / VAE converted to diffusers by diffusers' own LDM converters compute the same function.

Benchmark-only dependency: skipped when diffusers is not installed (``pip install -e .[bench]``).
Tiny random models, perturbed so that zero-initialised layers are live; checked in float32 (1e-4, what the
benchmarks rely on) and float64 (1e-10: any architectural difference, e.g. a GroupNorm eps or the head split,
shows up far above that).
"""

import pytest
import torch

pytest.importorskip("diffusers")

from autoencoder import AutoencoderKL  # noqa: E402
from benchmarks import diffusers_compat as dc  # noqa: E402
from ldm.diffusion import DDIMSampler, NoiseSchedule  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

TINY_UNET = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
    use_spatial_transformer=True, transformer_depth=1, context_dim=32, legacy=False,
)
TINY_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
    attn_resolutions=[], dropout=0.0,
)

UNET_VARIANTS = {
    # SD 2 style: linear proj_in/out, heads from num_head_channels (diffusers derives them itself).
    "linear-headchannels-attn12": dict(use_linear_in_transformer=True, attention_resolutions=[1, 2], num_head_channels=16),
    # SD 1 style: 1x1-conv proj_in/out, fixed head count.
    "conv-heads-attn2": dict(use_linear_in_transformer=False, attention_resolutions=[2], num_heads=2),
    "conv-heads-attn12": dict(use_linear_in_transformer=False, attention_resolutions=[1, 2], num_heads=4),
    # Conv projections with num_head_channels: diffusers' config function leaves the heads unset; we set them.
    "conv-headchannels-attn12": dict(use_linear_in_transformer=False, attention_resolutions=[1, 2], num_head_channels=16),
}


def _unet_pair(variant):
    params = {**TINY_UNET, **UNET_VARIANTS[variant]}
    ours = UNetModel(**params).eval()
    dc.perturb_parameters(ours, torch.Generator().manual_seed(1))
    theirs = dc.to_diffusers_unet(params, ours.state_dict())
    return params, ours, theirs


def _unet_inputs(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    t = torch.tensor([3, 400, 999])
    context = torch.randn(3, 7, 32, generator=g, dtype=torch.float64).to(dtype)
    return x, t, context


@pytest.mark.parametrize("variant", sorted(UNET_VARIANTS))
def test_unet_conversion_matches(variant):
    params, ours, theirs = _unet_pair(variant)
    proj = theirs.down_blocks[-1].attentions[0].proj_in
    assert isinstance(proj, torch.nn.Linear) == params["use_linear_in_transformer"]
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        ours.to(dtype), theirs.to(dtype)
        x, t, context = _unet_inputs(dtype)
        with torch.no_grad():
            expected = ours(x, t, context=context)
            actual = theirs(x, t, encoder_hidden_states=context).sample
        # The comparison only means something if the (perturbed) model's output is far from zero.
        assert expected.abs().mean() > 0.05
        assert dc.max_abs_diff(expected, actual) < tol, (variant, dtype)


def test_unet_conversion_detects_a_wrong_head_split():
    """A control: the same weights under a different head count give clearly different outputs."""
    params, ours, _ = _unet_pair("conv-heads-attn12")
    config = dc.diffusers_unet_config(params)
    assert config["attention_head_dim"] == 4
    from diffusers import UNet2DConditionModel

    wrong = UNet2DConditionModel.from_config({**config, "attention_head_dim": 2}).eval().double()
    wrong.load_state_dict(dc.convert_unet_state_dict(ours.state_dict(), config))
    ours.double()
    x, t, context = _unet_inputs(torch.float64)
    with torch.no_grad():
        assert dc.max_abs_diff(ours(x, t, context=context), wrong(x, t, encoder_hidden_states=context).sample) > 1e-4


def test_heads_per_level_follow_our_unet():
    assert dc.unet_heads_per_level({**TINY_UNET, "num_head_channels": 16}) == [2, 4]
    assert dc.unet_heads_per_level({**TINY_UNET, "num_heads": 8}) == [8, 8]
    demo = {**TINY_UNET, "model_channels": 64, "channel_mult": [1, 2, 2], "num_head_channels": 32}
    assert dc.unet_heads_per_level(demo) == [2, 4, 4]


def test_vae_conversion_matches():
    ours = AutoencoderKL(TINY_DDCONFIG, embed_dim=4).eval()
    dc.perturb_parameters(ours, torch.Generator().manual_seed(3))
    theirs = dc.to_diffusers_vae(TINY_DDCONFIG, 4, ours.state_dict(), scale_factor=0.5)
    assert theirs.config.scaling_factor == 0.5
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    image = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        ours.to(dtype), theirs.to(dtype)
        with torch.no_grad():
            decoded = ours.decode(z.to(dtype))
            assert decoded.abs().mean() > 0.05
            assert dc.max_abs_diff(decoded, theirs.decode(z.to(dtype)).sample) < tol
            posterior, their_posterior = ours.encode(image.to(dtype)), theirs.encode(image.to(dtype)).latent_dist
            assert dc.max_abs_diff(posterior.mean, their_posterior.mean) < tol
            assert dc.max_abs_diff(posterior.logvar, their_posterior.logvar) < tol


def test_unconvertible_configs_are_value_errors():
    with pytest.raises(ValueError, match="attn_resolutions"):
        dc.diffusers_vae_config({**TINY_DDCONFIG, "attn_resolutions": [8]}, 4)
    with pytest.raises(ValueError, match="embed_dim"):
        dc.diffusers_vae_config(TINY_DDCONFIG, 3)
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        dc.diffusers_unet_config({**TINY_UNET, "num_heads": 2, "attention_resolutions": [2], "use_scale_shift_norm": True})
    with pytest.raises(ValueError, match="num_res_blocks"):
        dc.diffusers_unet_config({**TINY_UNET, "num_heads": 2, "attention_resolutions": [2], "num_res_blocks": [1, 2]})


@pytest.mark.parametrize(
    "schedule_params, parameterization, spacing, first_two, last",
    [
        ({"kind": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}, "eps", "leading",
         [951, 901], 1),
        ({"kind": "cosine", "num_timesteps": 1000}, "v", "trailing", [999, 949], 49),  # the shipped demo's setting
    ],
)
def test_ddim_scheduler_setup_matches_our_ddim_sampler(schedule_params, parameterization, spacing, first_two, last):
    """Same betas and timesteps, and the same trajectory for a closed-form denoiser (float64, 20 steps)."""
    schedule = NoiseSchedule(**schedule_params)
    sampler = DDIMSampler(schedule, num_steps=20, timestep_spacing=spacing, parameterization=parameterization)
    scheduler = dc.diffusers_ddim_scheduler(schedule_params, parameterization, spacing)
    torch.testing.assert_close(scheduler.betas.double(), schedule.betas, atol=1e-6, rtol=1e-5)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == sampler.timesteps.tolist()
    assert sampler.timesteps.tolist()[:2] == first_two and sampler.timesteps.tolist()[-1] == last

    def eps_model(x, t, cond):
        return 0.3 * x + 0.001 * t.to(x.dtype).view(-1, 1, 1, 1)

    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = sampler.sample(eps_model, x_T, progress=False)
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()  # float64 tables on both sides
    scheduler.final_alpha_cumprod = schedule.alphas_cumprod[0].clone()
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(x, t.expand(2), None), int(t), x).prev_sample
    assert (ours - x_T).abs().max() > 0.1
    assert dc.max_abs_diff(ours, x) < 1e-10
