"""Inpainting on the one loop: the known region is the noised original at every step, the output is the input
outside the mask after paste-back, SD's 9-channel path conditions the UNet, masks are checked."""

import logging

import pytest
import torch

from ldm.assets import DEMO_CHECKPOINT
from ldm.data.shapes import ShapeSpec, image_to_tensor, render
from ldm.generate import generate
from ldm.inpainting import feathered, known_region_generators, latent_mask, prepare_mask
from ldm.models.latent_diffusion import LatentDiffusion


@pytest.fixture(scope="module")
def model():
    return LatentDiffusion.from_checkpoint(DEMO_CHECKPOINT).eval()


@pytest.fixture(scope="module")
def scene():
    """Two objects; the mask covers the top-left quarter (the red circle)."""
    image = image_to_tensor(render([ShapeSpec("circle", "red", "small", "top left"),
                                    ShapeSpec("square", "blue", "small", "bottom right")]))[None]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :32] = 1
    return image, mask


def test_the_known_region_is_the_noised_original_at_every_step(model, scene):
    image, mask = scene
    sampler = model.build_sampler({"name": "ddim", "num_steps": 5})  # eta 0: the guide draws the only noise
    seen = []
    model.inpaint(image, mask, ["a green square in the top left"], sampler, generator=[torch.Generator().manual_seed(1)],
                  known_generators=known_region_generators([1]), progress=False,
                  callback=lambda index, t, x_t, x0: seen.append((index, x_t.clone())))
    z0 = model.encode_images(image, sample=False)
    cells = latent_mask(mask, tuple(z0.shape[-2:]))
    stream = known_region_generators([1])[0]
    assert [i for i, _ in seen] == list(range(5))
    for index, x_t in seen:
        abar = float(sampler.input_alpha_cumprod(index))
        noise = torch.randn(z0.shape[1:], generator=stream)[None]
        expected = abar ** 0.5 * z0 + (1 - abar) ** 0.5 * noise
        keep = cells == 0
        torch.testing.assert_close(x_t.expand_as(z0)[keep.expand_as(z0)], expected[keep.expand_as(z0)],
                                   rtol=0, atol=1e-6)


def test_outside_the_mask_the_output_is_the_input(model, scene):
    image, mask = scene
    out = generate(model, ["a green square in the top left"], {"name": "ddim", "num_steps": 5}, [3],
                   progress=False, init_images=image, masks=mask)
    weight = feathered(mask)
    outside = weight == 0
    assert torch.equal(out.expand_as(image)[outside.expand_as(image)], image[outside.expand_as(image)])
    kept = mask == 0  # including the feathered seam
    mse = ((out - image) ** 2)[kept.expand_as(image)].mean()
    assert 10 * torch.log10(4 / mse) >= 30  # PSNR over [-1, 1] pixels
    assert (out - image)[mask.bool().expand_as(image)].abs().max() > 0.1  # and the masked part was repainted


def test_an_image_is_the_same_alone_and_in_a_batch(model, scene):
    image, mask = scene
    sampler = model.build_sampler({"name": "euler_a", "num_steps": 4})
    prompts = ["a green square in the top left", "a white circle in the top left"]
    both = generate(model, prompts, sampler, [5, 6], progress=False, init_images=image.expand(2, -1, -1, -1),
                    masks=mask.expand(2, -1, -1, -1), batch_size=2)
    alone = generate(model, prompts[1:], sampler, [6], progress=False, init_images=image, masks=mask)
    torch.testing.assert_close(both[1], alone[0], atol=1e-4, rtol=0)


def test_a_nine_channel_inpainting_unet_sees_mask_and_masked_image(model, scene):
    """SD's inpainting checkpoints: UNet input = cat([x_t, mask, E(image * (1 - mask))]) (a tiny random model)."""
    import copy

    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = copy.deepcopy(model.config)
    config["unet"]["params"]["in_channels"] = 9
    config["inpainting"] = True
    torch.manual_seed(0)
    nine = LatentDiffusion.from_config(config).eval()
    inputs = []
    hook = nine.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    image, mask = scene
    try:
        out = nine.inpaint(image, mask, ["a green square"], {"name": "ddim", "num_steps": 2}, guidance_scale=3.0,
                           progress=False)
    finally:
        hook.remove()
    assert isinstance(nine.unet, UNetModel) and out.shape == image.shape
    x = inputs[0]
    assert x.shape[1] == 9 and x.shape[0] == 2  # guidance: cond and uncond in one batch
    small = torch.nn.functional.interpolate(mask, size=x.shape[-2:], mode="nearest")
    masked = nine.encode_images(image * (1 - mask), sample=False)
    for row in x:
        torch.testing.assert_close(row[4:5], small[0], rtol=0, atol=0)
        torch.testing.assert_close(row[5:], masked[0], rtol=1e-5, atol=1e-5)


def test_masks_are_checked(caplog):
    with caplog.at_level(logging.INFO, logger="ldm.inpainting"):
        mask = prepare_mask(torch.full((1, 1, 32, 32), 0.7), (64, 64))
    assert mask.shape == (1, 1, 64, 64) and torch.equal(mask, torch.ones_like(mask))
    assert "mask resized" in caplog.text and "not binary" in caplog.text
    with pytest.raises(ValueError, match="one channel"):
        prepare_mask(torch.zeros(1, 3, 8, 8), (8, 8))


def test_the_inpaint_command(tmp_path, scene):
    import json

    import numpy as np
    from PIL import Image

    from scripts import inpaint

    image, mask = scene
    Image.fromarray(((image[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(tmp_path / "in.png")
    Image.fromarray((mask[0, 0] * 255).byte().numpy()[::2, ::2]).save(tmp_path / "mask.png")  # half size: resized
    written = inpaint.main(["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--prompt",
                            "a green square in the top left", "--steps", "4", "--no-progress",
                            "--outdir", str(tmp_path / "out")])
    out = np.asarray(Image.open(written[0]), dtype=np.int16)
    source = np.asarray(Image.open(tmp_path / "in.png"), dtype=np.int16)
    outside = (feathered(mask)[0, 0] == 0).numpy()
    assert np.abs(out - source)[outside].max() <= 1  # PNG rounding at most
    meta = json.loads(Image.open(written[0]).text["parameters"])
    assert meta["mask"].endswith("mask.png") and meta["image"].endswith("in.png")
    with pytest.raises(SystemExit, match="--mask: no such file"):
        inpaint.main(["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "nope.png"), "--prompt", "x"])


def test_random_training_masks():
    from ldm.inpainting import random_masks

    masks = random_masks(64, 32, 32, torch.Generator().manual_seed(0))
    assert masks.shape == (64, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    whole = (masks.flatten(1).mean(1) == 1).float().mean()
    assert 0.1 < whole < 0.45  # about a quarter of the masks are the whole image
    partial = masks[masks.flatten(1).mean(1) < 1]
    assert (partial.flatten(1).mean(1) > 0).all()  # the others repaint something, not everything


def test_an_inpainting_variant_starts_as_its_base_model_and_trains(trained, tmp_path):
    """--init-from a text-to-image model: the 9-channel UNet's extra input channels start at zero (the same
    function as the base model), and it trains on random masks."""
    from safetensors.torch import load_file

    from scripts import train_diffusion
    from tests.helpers import TINY_DIFFUSION_CONFIG

    base_path, _ = trained
    options = ["--config", TINY_DIFFUSION_CONFIG, "--init-from", base_path, "--max-steps", "2",
               "model.unet.params.in_channels=9", "model.inpainting=true", "lightning.image_every=2"]
    out = train_diffusion.main(options[:4] + ["--run-dir", str(tmp_path / "zero")] + options[4:]
                               + ["trainer.params.learning_rate=0.0"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    base, widened = load_file(base_path)[key], load_file(out)[key]
    assert widened.shape[1] == 9 and torch.equal(widened[:, :4], base) and not widened[:, 4:].any()
    nine, four = LatentDiffusion.from_checkpoint(out), LatentDiffusion.from_checkpoint(base_path)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 90])
    context = four.encode_text(["a red square", ""])
    extra = torch.randn(2, 5, 8, 8)
    torch.testing.assert_close(nine.model_fn(torch.cat([x, extra], 1), t, context), four.model_fn(x, t, context))
    assert (tmp_path / "zero" / "images" / "inpaint_step000002.png").is_file()  # grids inpaint the batch

    out = train_diffusion.main(options[:4] + ["--run-dir", str(tmp_path / "train")] + options[4:])
    assert load_file(out)[key][:, 4:].abs().sum() > 0  # the new channels learn


@pytest.mark.parametrize("name", ["ddim", "euler_a", "heun"])
def test_a_run_split_at_last_step_is_the_same_run(name):
    """last_step stops part-way and hands over the state in DDPM space: two halves equal one run."""
    from ldm.diffusion import NoiseSchedule, build_sampler

    schedule = NoiseSchedule("cosine", 100)
    sampler = build_sampler(name, schedule, num_steps=6, **({"eta": 1.0} if name == "ddim" else {}))
    model_fn = lambda x, t, cond: 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1)  # noqa: E731
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = sampler.sample(model_fn, x_T, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                           progress=False)
    streams = [torch.Generator().manual_seed(s) for s in (1, 2)]
    half = sampler.sample(model_fn, x_T, generator=streams, progress=False, last_step=3)
    rest = sampler.sample(model_fn, half, generator=streams, progress=False, first_step=3)
    torch.testing.assert_close(rest, whole, rtol=1e-5, atol=1e-5)


def test_renoise_reaches_the_noisier_marginal():
    """x ~ q(x | x0) at abar 0.8, renoised to 0.3: mean sqrt(0.3) x0, variance 0.7 (Monte Carlo, float64)."""
    from ldm.inpainting import renoise

    x0 = torch.tensor([0.5, -1.0], dtype=torch.float64)
    n = 200_000
    x = 0.8 ** 0.5 * x0 + 0.2 ** 0.5 * torch.randn(n, 2, dtype=torch.float64)
    y = renoise(x, 0.8, 0.3)
    torch.testing.assert_close(y.mean(0), 0.3 ** 0.5 * x0, atol=0.01, rtol=0)
    torch.testing.assert_close(y.var(0), torch.full((2,), 0.7, dtype=torch.float64), atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="noisier"):
        renoise(x, 0.3, 0.8)


def test_repaint_jumps_keep_the_input_and_change_the_result(model, scene):
    image, mask = scene
    prompts, sampler = ["a green square in the top left"], {"name": "ddim", "num_steps": 4}
    plain = generate(model, prompts, sampler, [3], progress=False, init_images=image, masks=mask)
    resampled = generate(model, prompts, sampler, [3], progress=False, init_images=image, masks=mask, jumps=2)
    outside = (feathered(mask) == 0).expand_as(image)
    assert torch.equal(resampled[outside], image[outside])
    assert not torch.equal(resampled, plain)
