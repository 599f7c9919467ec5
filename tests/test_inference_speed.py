"""The inference speed settings (ldm/inference.py) keep the plain float32 output within their stated tolerances."""

from __future__ import annotations

import pytest
import torch

from benchmarks.diffusers_compat import perturb_parameters
from ldm.generate import autocast_for, generate
from ldm.inference import compiler_available, prepare_for_inference
from ldm.models.latent_diffusion import LatentDiffusion

PROMPTS = ["a red circle", "a blue square in the top left"]


def perturbed_model(weights) -> LatentDiffusion:
    """The tiny trained model with every weight perturbed: its zero-initialised layers would hide differences."""
    model = LatentDiffusion.from_checkpoint(weights).eval()
    perturb_parameters(model.unet, torch.Generator().manual_seed(1))
    perturb_parameters(model.first_stage_model, torch.Generator().manual_seed(2))
    return model


def sample(model, autocast=None) -> torch.Tensor:
    return generate(model, PROMPTS, {"name": "ddim", "num_steps": 4}, seeds=[0, 1], guidance_scale=3.0,
                    height=16, width=16, progress=False, autocast=autocast)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def reference(trained):
    model = perturbed_model(trained[0])
    return model, sample(model)


def test_channels_last_keeps_the_output(trained, reference):
    _, plain = reference
    model = prepare_for_inference(perturbed_model(trained[0]), channels_last=True)
    assert model.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.first_stage_model.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.abs().max() > 0.1  # a non-trivial image
    assert relative_difference(sample(model), plain) < 1e-5


def test_bf16_autocast_stays_within_its_stated_tolerance(reference):
    model, plain = reference
    fast = sample(model, autocast=autocast_for("cpu", "bf16"))
    assert 0 < relative_difference(fast, plain) < 5e-2  # it did run in bf16, and stays close


def test_autocast_settings_are_checked():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_for("cpu", "fp16")
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        autocast_for("cpu", "int8")


@pytest.mark.skipif(not compiler_available(), reason="TorchInductor needs a C++ compiler on the CPU")
def test_compiled_unet_and_decoder_keep_the_output_and_the_keys(trained, reference):
    _, plain = reference
    model = perturbed_model(trained[0])
    keys = list(model.state_dict())
    prepare_for_inference(model, channels_last=False, compile=True)
    assert list(model.state_dict()) == keys  # nn.Module.compile keeps names: checkpoints still load
    assert relative_difference(sample(model), plain) < 1e-4


def test_compile_without_a_compiler_falls_back_with_a_warning(trained, monkeypatch, caplog):
    import ldm.inference

    monkeypatch.setattr(ldm.inference.shutil, "which", lambda name: None)
    model = perturbed_model(trained[0])
    with caplog.at_level("WARNING"):
        prepare_for_inference(model, channels_last=False, compile=True)
    assert "no C++ compiler" in caplog.text
    assert model.unet._compiled_call_impl is None
