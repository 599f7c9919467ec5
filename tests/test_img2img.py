"""img2img (SDEdit) on the shared generation loop: exact ends, every sampler, per-image streams, bad input."""

import pytest
import torch

from ldm.assets import DEMO_CHECKPOINT
from ldm.data.shapes import ShapeSpec, image_to_tensor, render
from ldm.diffusion import SAMPLERS
from ldm.generate import generate
from ldm.models.latent_diffusion import LatentDiffusion


@pytest.fixture(scope="module")
def model():
    return LatentDiffusion.from_checkpoint(DEMO_CHECKPOINT).eval()


@pytest.fixture(scope="module")
def picture():
    """A rendered shapes image ``[1, 3, 64, 64]`` in [-1, 1]."""
    return image_to_tensor(render([ShapeSpec("circle", "red", "large", "center")]))[None]


def test_strength_zero_is_the_autoencoder_round_trip(model, picture):
    out = generate(model, ["a blue square"], "ddim", [1], progress=False, init_images=picture, strength=0.0)
    expected = model.decode_latents(model.encode_images(picture, sample=False)).clamp(-1, 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_strength_one_is_txt2img_and_every_sampler_edits(model, picture, name):
    if name == "ddpm":  # DDPM walks every step of its schedule: an 8-step schedule keeps the test fast
        from ldm.diffusion import NoiseSchedule

        model = LatentDiffusion(model.first_stage_model, model.cond_stage_model, model.unet,
                                NoiseSchedule("cosine", 8), model.scale_factor, model.parameterization)
        sampler = model.build_sampler("ddpm")
    else:
        sampler = model.build_sampler({"name": name, "num_steps": 4})
    prompt, seed = ["a blue square"], [5]
    txt2img = generate(model, prompt, sampler, seed, progress=False)
    full = generate(model, prompt, sampler, seed, progress=False, init_images=picture, strength=1.0)
    assert torch.equal(full, txt2img)
    half = generate(model, prompt, sampler, seed, progress=False, init_images=picture, strength=0.5)
    again = generate(model, prompt, sampler, seed, progress=False, init_images=picture, strength=0.5)
    assert torch.equal(half, again)  # the same seed, the same image
    # part-way: closer to the input than txt2img is, and not the input's reconstruction
    recon = generate(model, prompt, sampler, seed, progress=False, init_images=picture, strength=0.0)
    assert (half - recon).abs().mean() < (txt2img - recon).abs().mean()
    assert not torch.equal(half, recon)


def test_img2img_starts_from_the_noised_image_on_the_samplers_grid(model, picture):
    """The state entering the first run step is sqrt(abar) z0 + sqrt(1 - abar) noise, abar of that step."""
    sampler = model.build_sampler({"name": "ddim", "num_steps": 10})
    seen = []
    original = sampler.sample

    def probe(model_fn, x_T, *args, first_step=0, **kwargs):
        seen.append((first_step, x_T.clone()))
        return original(model_fn, x_T, *args, first_step=first_step, **kwargs)

    sampler.sample = probe
    generator = torch.Generator().manual_seed(3)
    model.img2img(picture, ["a red circle"], sampler, strength=0.3, generator=[generator], progress=False)
    first_step, x = seen[0]
    assert first_step == 7  # round(0.3 * 10) = 3 steps run: the last three
    abar = float(model.schedule.alphas_cumprod[sampler.timesteps[7]])
    z0 = model.encode_images(picture, sample=False)
    noise = torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(3))[None]
    torch.testing.assert_close(x, abar ** 0.5 * z0 + (1 - abar) ** 0.5 * noise, rtol=0, atol=1e-6)


def test_bad_strength_and_sizes(model, picture):
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\], got 1.5"):
        model.img2img(picture, ["x"], "ddim", strength=1.5)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.img2img(torch.zeros(1, 3, 40, 40), ["x"], "ddim", strength=0.5)


def test_the_img2img_command(tmp_path, picture):
    import json

    import numpy as np
    from PIL import Image

    from scripts import img2img, txt2img

    rgba = np.zeros((80, 80, 4), dtype=np.uint8)  # a larger RGBA input: resized, alpha composited
    rgba[20:60, 20:60] = (255, 0, 0, 255)
    path = tmp_path / "in.png"
    Image.fromarray(rgba, "RGBA").save(path)
    common = ["--prompt", "a blue square", "--steps", "4", "--seed", "11", "--no-progress"]
    written = img2img.main(common + ["--init-img", str(path), "--strength", "0.5", "--outdir", str(tmp_path / "a")])
    meta = json.loads(Image.open(written[0]).text["parameters"])
    assert meta["strength"] == 0.5 and meta["init_img"] == str(path) and meta["seed"] == 11
    assert Image.open(written[0]).size == (64, 64) and (tmp_path / "a" / "grid.png").is_file()
    # strength 1 with the same seed: txt2img's image, pixel for pixel
    full = img2img.main(common + ["--init-img", str(path), "--strength", "1", "--outdir", str(tmp_path / "b")])
    plain = txt2img.main(common + ["--outdir", str(tmp_path / "c")])
    assert np.array_equal(np.asarray(Image.open(full[0])), np.asarray(Image.open(plain[0])))
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((64, 64), 128, dtype=np.uint8), "L").save(grey)
    assert img2img.main(common + ["--init-img", str(grey), "--strength", "0.3", "--outdir", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="--strength must be in"):
        img2img.main(common + ["--init-img", str(path), "--strength", "1.2"])
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((72, 72, 3), dtype=np.uint8)).save(odd)
    with pytest.raises(SystemExit, match="keep-size.*multiples of 16"):
        img2img.main(common + ["--init-img", str(odd), "--keep-size", "--outdir", str(tmp_path / "e")])
    kept = img2img.main(common + ["--init-img", str(path), "--keep-size", "--strength", "0.2",
                                  "--outdir", str(tmp_path / "f")])
    assert Image.open(kept[0]).size == (80, 80)  # a multiple of 16: kept


def test_an_edited_image_is_the_same_alone_and_in_a_batch(model, picture):
    sampler = model.build_sampler({"name": "euler_a", "num_steps": 4})
    prompts = ["a blue square", "a green circle", "a white triangle"]
    both = generate(model, prompts, sampler, [4, 5, 6], progress=False, init_images=picture.expand(3, -1, -1, -1),
                    strength=0.6, batch_size=3)
    alone = generate(model, prompts[1:2], sampler, [5], progress=False, init_images=picture, strength=0.6)
    torch.testing.assert_close(both[1], alone[0], atol=1e-4, rtol=0)
