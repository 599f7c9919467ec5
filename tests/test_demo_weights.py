"""The demo weights shipped in the package (ldm/assets/demo-shapes.safetensors)."""

import json
import os

import pytest
from PIL import Image

from ldm.assets import DEMO_CHECKPOINT
from ldm.models.latent_diffusion import LatentDiffusion
from scripts import evaluate, txt2img


def test_shipped_weights_exist_within_size_budget_and_load():
    assert os.path.isfile(DEMO_CHECKPOINT), "demo weights missing: see README 'The demo' for the command"
    assert os.path.getsize(DEMO_CHECKPOINT) <= 25 * 2**20
    model = LatentDiffusion.from_checkpoint(DEMO_CHECKPOINT)
    assert model.config["image_size"] == 64
    assert model.latent_shape(64, 64) == (4, 16, 16)


def test_txt2img_without_ckpt_uses_the_shipped_weights(tmp_path):
    paths = txt2img.main(["--prompt", "a red circle", "--steps", "5", "--seed", "3", "--outdir", str(tmp_path),
                          "--no-progress"])
    image = Image.open(paths[0])
    assert image.size == (64, 64)
    settings = json.loads(image.text["parameters"])
    assert settings["prompt"] == "a red circle" and settings["checkpoint"] == os.path.abspath(DEMO_CHECKPOINT)


@pytest.mark.slow
def test_shipped_weights_meet_the_accuracy_targets(tmp_path):
    """README's numbers: DDIM 50 steps, guidance 5, one sample per evaluation prompt."""
    accuracy = evaluate.main(["--no-progress", "--json", str(tmp_path / "eval.json")])
    assert accuracy["single"] >= 0.90
    assert accuracy["position"] >= 0.80
    assert accuracy["two_objects"] >= 0.60
    assert accuracy["unseen_pairs"] >= 0.60


def test_shipped_weights_draw_what_a_simple_prompt_says():
    """Default run: 8 single-object prompts at DDIM 20 steps score >= 7/8 (shipped model, DDIM 50: 96-97%)."""
    import torch

    from ldm.eval.shapes_eval import evaluate_images
    from ldm.generate import generate

    model = LatentDiffusion.from_checkpoint(DEMO_CHECKPOINT).eval()
    prompts = ["a red circle", "a green square", "a blue triangle", "a white circle", "a large yellow square",
               "a small cyan triangle", "a magenta triangle", "a red square"]
    with torch.no_grad():
        images = generate(model, prompts, {"name": "ddim", "num_steps": 20}, seeds=list(range(8)), batch_size=8,
                          progress=False)
    results = evaluate_images([("single", p, im) for p, im in zip(prompts, images)])
    assert results["overall"]["correct"] >= 7, results
