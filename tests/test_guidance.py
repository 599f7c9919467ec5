"""Classifier-free guidance wrapper: the combination rule, one batched call per step, conditioning plumbing."""

import pytest
import torch

from ldm.diffusion import DDIMSampler, DDPMSampler, NoiseSchedule, classifier_free_guidance


class CountingModel:
    """out = x * w(cond) + t / 1000 + cond (per sample); records every call's batch size."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        assert t.shape == (x.shape[0],) and cond.shape[0] == x.shape[0]
        return x * (1 + cond.mean(dim=1)).view(-1, 1, 1) + t.view(-1, 1, 1) / 1000 + cond.mean(dim=1).view(-1, 1, 1)


def test_combination_rule_and_single_batched_call():
    model = CountingModel()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    t = torch.tensor([10, 500, 999])
    cond = torch.randn(3, 7, dtype=torch.float64)
    uncond = torch.zeros(3, 7, dtype=torch.float64)
    out_c, out_u = model(x, t, cond), model(x, t, uncond)
    model.batches.clear()
    for scale in (0.0, 1.0, 7.5, -2.0):
        guided = classifier_free_guidance(model, scale)
        out = guided(x, t, (cond, uncond))
        assert model.batches[-1] == 6  # one call on the batch of 2B
        torch.testing.assert_close(out, out_u + scale * (out_c - out_u), rtol=1e-12, atol=1e-12)
    assert len(model.batches) == 4
    torch.testing.assert_close(classifier_free_guidance(model, 1.0)(x, t, (cond, uncond)), out_c, rtol=0, atol=1e-12)
    torch.testing.assert_close(classifier_free_guidance(model, 0.0)(x, t, (cond, uncond)), out_u, rtol=0, atol=1e-12)


def test_no_guidance_is_the_plain_model():
    model = CountingModel()
    assert classifier_free_guidance(model, None) is model


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, DDPMSampler])
def test_one_model_call_per_step_in_a_sampler(sampler_cls):
    schedule = NoiseSchedule("scaled_linear", 1000)
    sampler = DDIMSampler(schedule, 12, eta=0.5) if sampler_cls is DDIMSampler else DDPMSampler(schedule, num_steps=9)
    model = CountingModel()
    guided = classifier_free_guidance(model, 7.5)
    B = 2
    cond, uncond = torch.randn(B, 4), torch.zeros(B, 4)
    x_T = torch.randn(B, 3, 3)
    out = sampler.sample(guided, x_T, cond=(cond, uncond), progress=False)
    assert out.shape == x_T.shape
    assert model.batches == [2 * B] * sampler.num_model_evaluations


def test_guided_samples_equal_conditional_samples_at_scale_one():
    schedule = NoiseSchedule("scaled_linear", 1000)
    sampler = DDIMSampler(schedule, 10, eta=1.0)
    model = CountingModel()
    x_T = torch.randn(2, 3, 3, dtype=torch.float64)
    cond, uncond = torch.randn(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    guided = sampler.sample(
        classifier_free_guidance(model, 1.0), x_T, (cond, uncond), torch.Generator().manual_seed(0), progress=False
    )
    plain = sampler.sample(model, x_T, cond, torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(guided, plain, rtol=1e-10, atol=1e-10)


def test_structured_conditioning():
    seen = {}

    def model(x, t, cond):
        seen["cond"] = cond
        return x * cond["c_crossattn"][0].mean(dim=(1, 2)).view(-1, 1) + cond["y"].view(-1, 1)

    guided = classifier_free_guidance(model, 3.0)
    x, t = torch.randn(2, 5), torch.tensor([1, 2])
    cond = {"c_crossattn": [torch.ones(2, 77, 8)], "y": torch.tensor([1.0, 2.0])}
    uncond = {"c_crossattn": [torch.zeros(2, 77, 8)], "y": torch.tensor([0.0, 0.0])}
    out = guided(x, t, (cond, uncond))
    assert seen["cond"]["c_crossattn"][0].shape == (4, 77, 8)
    # uncond first, then cond (as Stable Diffusion's samplers batch them)
    assert seen["cond"]["y"].tolist() == [0.0, 0.0, 1.0, 2.0]
    out_c = x * 1 + torch.tensor([[1.0], [2.0]])
    out_u = torch.zeros_like(x)
    torch.testing.assert_close(out, out_u + 3.0 * (out_c - out_u))
    # a 0-d t is broadcast over the batch
    torch.testing.assert_close(guided(x, torch.tensor(1), (cond, uncond)), out)


def test_bad_inputs():
    model = CountingModel()
    guided = classifier_free_guidance(model, 5.0)
    x, t = torch.randn(2, 3, 3), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="pair"):
        guided(x, t, torch.randn(2, 4))
    with pytest.raises(ValueError, match="concatenate"):
        guided(x, t, (torch.randn(2, 4), torch.randn(2, 5)))
    with pytest.raises(ValueError, match="keys"):
        classifier_free_guidance(lambda x, t, c: x, 2.0)(x, t, ({"a": torch.ones(2)}, {"b": torch.ones(2)}))
    with pytest.raises(ValueError):
        classifier_free_guidance(model, "7.5")
