"""Our models as diffusers folders (``convert_checkpoint --to diffusers``) and back, offline, in float32.

* ours -> diffusers -> ours is bit-equal (every tensor, and the config: schedule, parameterization, scale factor,
  sampler defaults) for the shipped demo model and tiny SD 1-style (HF-layout CLIP, last and penultimate layer) and
  SD 2-style (open_clip, penultimate layer) models;
* ``StableDiffusionPipeline.from_pretrained(folder)`` samples, with the same starting latents and DDIM, the image
  ``LatentDiffusion.sample`` does, and its ``encode_prompt`` is our ``encode_text``;
* a diffusers folder without our two extra files (as published SD folders are) still loads as an equivalent model;
* without the ``diffusers`` extra the error says how to install it.
"""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from ldm.interop import diffusers as ldm_diffusers
from ldm.interop.export import convert_checkpoint
from ldm.models.latent_diffusion import LatentDiffusion

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from benchmarks.diffusers_compat import perturb_parameters  # noqa: E402

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3}
PROMPTS = ["a red circle on a blue background", "", "wow!! a green square, it's 4k (masterpiece)"]


def tiny_config(kind):
    """An SD 1-style (``v1``, ``v1-penultimate``: FrozenCLIPEmbedder, conv projections, fixed heads) or SD 2-style
    (``v2``: open_clip tower, penultimate layer, linear projections, head channels, v-prediction) model config."""
    v1 = kind.startswith("v1")
    if v1:
        text = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"arch": "tiny", "version": None, "max_length": 77,
                           "layer": "penultimate" if kind == "v1-penultimate" else "last",
                           "model_config": {"embed_dim": 32, "quick_gelu": True, "text_cfg": TEXT_CFG}}}
        heads = {"num_heads": 2, "use_linear_in_transformer": False}
    else:
        text = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"arch": "tiny", "version": None, "max_length": 77, "layer": "penultimate",
                           "model_config": {"embed_dim": 24, "text_cfg": TEXT_CFG}}}
        heads = {"num_head_channels": 16, "use_linear_in_transformer": True}
    return {
        "image_size": 16,
        "parameterization": "eps" if v1 else "v",
        "scale_factor": 0.18215,
        "sampler_defaults": {} if v1 else {"ddim": {"timestep_spacing": "leading", "steps_offset": 1},
                                           "euler_a": {"sigma_spacing": "uniform"}},
        "text_encoder": text,
        "unet": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1, 2],
            "num_res_blocks": 1, "channel_mult": [1, 2], "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": 32, "legacy": False, **heads}},
        "schedule": {"target": "ldm.diffusion.NoiseSchedule", "params": {
            "kind": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}},
        "autoencoder": {"target": "autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3,
                                         "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                         "attn_resolutions": [], "dropout": 0.0}}},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (our .safetensors, the diffusers folder written from it by convert_checkpoint)}."""
    from ldm.assets import DEMO_CHECKPOINT
    from scripts import convert_checkpoint as script

    root = tmp_path_factory.mktemp("diffusers")
    files = {"demo": DEMO_CHECKPOINT}
    for seed, kind in enumerate(("v1", "v1-penultimate", "v2")):
        torch.manual_seed(seed)
        model = LatentDiffusion.from_config(tiny_config(kind))
        perturb_parameters(model, torch.Generator().manual_seed(seed))
        files[kind] = str(root / f"{kind}.safetensors")
        model.save(files[kind])
    out = {}
    for name, path in files.items():
        folder = str(root / f"{name}-diffusers")
        assert script.main(["--ckpt", path, "--to", "diffusers", "--out", folder]) == [folder]
        out[name] = (path, folder)
    return out


def load_pipeline(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


NAMES = ["demo", "v1", "v1-penultimate", "v2"]


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", NAMES)
def test_ours_to_diffusers_to_ours_is_bit_equal(exported, name, tmp_path):
    from scripts import convert_checkpoint as script

    path, folder = exported[name]
    back = script.main(["--ckpt", folder, "--to", "ours", "--out", str(tmp_path / "back.safetensors")])[0]
    original, again = LatentDiffusion.from_checkpoint(path), LatentDiffusion.from_checkpoint(back)
    own = original.state_dict()
    assert again.state_dict().keys() == own.keys()
    for key, value in again.state_dict().items():
        assert value.dtype == own[key].dtype and torch.equal(value, own[key]), key
    assert again.config == original.config
    assert (again.parameterization, again.scale_factor, again.sampler_defaults) == \
        (original.parameterization, original.scale_factor, original.sampler_defaults)
    assert again.config["schedule"] == original.config["schedule"]


@pytest.mark.parametrize("name", NAMES)
def test_the_folder_is_a_stable_diffusion_pipeline(exported, name):
    path, folder = exported[name]
    model = LatentDiffusion.from_checkpoint(path)
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]

    text = json.load(open(os.path.join(folder, "text_encoder", "config.json")))
    params = model.config["text_encoder"]["params"]
    layers = params["model_config"]["text_cfg"]["layers"]
    penultimate = params["layer"] == "penultimate"
    assert text["num_hidden_layers"] == layers - penultimate  # diffusers' SD 2 text encoder: one block fewer
    sd1 = name.startswith("v1")
    assert text["hidden_act"] == ("quick_gelu" if sd1 else "gelu")
    assert text["projection_dim"] == params["model_config"]["embed_dim"]
    tokenizer = json.load(open(os.path.join(folder, "tokenizer", "tokenizer_config.json")))
    assert tokenizer["pad_token"] == ("<|endoftext|>" if sd1 else "!") and tokenizer["model_max_length"] == 77
    # as published SD folders have them (older transformers read these): text_model.* keys, vocab.json / merges.txt
    text_weights = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    assert all(k.startswith("text_model.") for k in text_weights)
    assert len(json.load(open(os.path.join(folder, "tokenizer", "vocab.json"), encoding="utf-8"))) == 49408
    assert os.path.isfile(os.path.join(folder, "tokenizer", "merges.txt"))

    scheduler = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    assert scheduler["prediction_type"] == {"eps": "epsilon", "v": "v_prediction"}[model.parameterization]
    assert scheduler["timestep_spacing"] == ("trailing" if name == "demo" else "leading")
    assert scheduler["beta_schedule"] == ("squaredcos_cap_v2" if name == "demo" else "scaled_linear")
    assert (scheduler["set_alpha_to_one"], scheduler["clip_sample"]) == (False, False)
    vae = json.load(open(os.path.join(folder, "vae", "config.json")))
    assert vae["scaling_factor"] == model.scale_factor

    # what CLIPTextModel has no place for rides along under our keys; nothing else does
    extra_path = os.path.join(folder, "text_encoder", "ldm_extra.safetensors")
    if sd1 and not penultimate:
        assert not os.path.exists(extra_path)
    else:
        extra = load_file(extra_path)
        own = model.state_dict()
        last = (f"cond_stage_model.transformer.text_model.encoder.layers.{layers - 1}." if sd1
                else f"cond_stage_model.model.transformer.resblocks.{layers - 1}.")
        expected = {k for k in own if penultimate and k.startswith(last)}
        if not sd1:
            expected |= {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
        assert set(extra) == expected
        assert all(torch.equal(extra[k], own[k]) for k in extra)
    stored = json.load(open(os.path.join(folder, "ldm_config.json")))["config"]
    assert stored == model.config


def test_sd_file_from_a_diffusers_folder_equals_the_direct_export(exported, tmp_path):
    """diffusers -> SD keeps SD 2's layout: the penultimate tower's last block and the projection are back."""
    path, folder = exported["v2"]
    direct = load_file(convert_checkpoint(path, "sd", tmp_path / "direct.safetensors")[0])
    via = load_file(convert_checkpoint(folder, "sd", tmp_path / "via.safetensors")[0])
    assert via.keys() == direct.keys()
    assert all(torch.equal(via[k], direct[k]) for k in direct)


# ------------------------------------------------------------------------------------------------ same outputs


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_encode_prompt_is_our_encode_text(exported, name):
    path, folder = exported[name]
    model = LatentDiffusion.from_checkpoint(path).eval()
    pipe = load_pipeline(folder)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
        ours = model.encode_text(PROMPTS)
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, model.cond_stage_model.tokenize(PROMPTS))  # incl. the "!" and the padding
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_samples_our_image(exported, name):
    path, folder = exported[name]
    model = LatentDiffusion.from_checkpoint(path).eval()
    pipe = load_pipeline(folder)
    channels, h, w = model.latent_shape(model.config["image_size"], model.config["image_size"])
    x_T = torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(7))
    prompt = ["a red circle on a blue background"]
    with torch.no_grad():
        # our default DDIM (the model's sampler_defaults: trailing spacing for the demo) at 10 steps, guidance 5
        ours = model.sample(prompt, {"name": "ddim", "num_steps": 10}, guidance_scale=5.0, x_T=x_T, progress=False)
        theirs = pipe(prompt, num_inference_steps=10, guidance_scale=5.0, latents=x_T.clone(), output_type="pt").images
    ours = (ours / 2 + 0.5).clamp(0, 1)  # the pipeline's postprocessing of [-1, 1] pixels
    assert theirs.shape == ours.shape
    assert ours.std() > 0.02  # a real image, not a constant
    difference = (theirs - ours).abs().max().item()
    print(f"{name}: max abs pixel difference {difference:.3g}")
    assert difference <= 1e-3


# ------------------------------------------------------------------------------------------------ other folders


def test_a_folder_without_our_files_loads_as_an_equivalent_model(exported, tmp_path):
    """Published diffusers folders have no ldm_config.json / ldm_extra: the config is read off the diffusers configs,
    and an SD 2 text encoder (one block fewer, final norm) becomes the equivalent layer="last" tower."""
    import shutil

    path, folder = exported["v2"]
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    os.remove(plain / "ldm_config.json")
    os.remove(plain / "text_encoder" / "ldm_extra.safetensors")
    original = LatentDiffusion.from_checkpoint(path).eval()
    model = ldm_diffusers.load_diffusers(plain)
    text = model.config["text_encoder"]
    assert text["target"].endswith("FrozenOpenCLIPEmbedder") and text["params"]["layer"] == "last"
    assert text["params"]["model_config"]["text_cfg"]["layers"] == TEXT_CFG["layers"] - 1
    assert model.config["schedule"] == original.config["schedule"]
    assert model.parameterization == "v" and model.scale_factor == original.scale_factor
    assert model.config["unet"]["params"]["num_head_channels"] == 16
    own, theirs = original.state_dict(), model.state_dict()
    for key, value in theirs.items():
        if not key.startswith("cond_stage_model."):
            assert torch.equal(value, own[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(PROMPTS), original.encode_text(PROMPTS), atol=1e-6, rtol=0)

    # a swapped scheduler wins over our stored one: an Euler scheduler, trailing spacing
    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    config_path = swapped / "scheduler" / "scheduler_config.json"
    scheduler = json.load(open(config_path))
    scheduler.update(_class_name="EulerDiscreteScheduler", timestep_spacing="trailing", prediction_type="epsilon")
    config_path.write_text(json.dumps(scheduler))
    config = ldm_diffusers.config_from_diffusers(swapped)
    assert config["parameterization"] == "eps"
    assert config["sampler_defaults"] == {"ddim": {"timestep_spacing": "trailing"}}
    assert config["text_encoder"] == original.config["text_encoder"]  # the other parts still match: ours kept


def test_inverse_plan_is_exact_for_rearrangements_and_refuses_arithmetic():
    shapes = {"a": torch.Size([6, 4]), "b": torch.Size([3, 2, 1, 1]), "dropped": torch.Size([5])}

    def forward(sd):  # split, transpose, squeeze, rename, drop
        return {"a_top": sd["a"][:2].T.contiguous(), "a_rest": sd["a"][2:].clone(), "b2d": sd["b"][:, :, 0, 0]}

    plan, their_shapes = ldm_diffusers.inverse_plan(forward, shapes, budget=20)  # several batches
    assert their_shapes == {"a_top": torch.Size([4, 2]), "a_rest": torch.Size([4, 4]), "b2d": torch.Size([3, 2])}
    assert plan["dropped"] == []
    ours = {k: torch.randn(s, dtype=torch.float32) for k, s in shapes.items()}
    back = ldm_diffusers.apply_inverse(plan, shapes, forward(ours), "toy")
    assert set(back) == {"a", "b"} and all(torch.equal(back[k], ours[k]) for k in back)
    with pytest.raises(ValueError, match="not a pure rearrangement"):
        ldm_diffusers.inverse_plan(lambda sd: {"a": sd["a"] * 2}, {"a": torch.Size([3])})


def test_an_existing_folder_is_not_overwritten(exported, tmp_path):
    path, _ = exported["v1"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        convert_checkpoint(path, "diffusers", tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_without_the_extra_the_error_says_how_to_install_it(exported, monkeypatch, tmp_path):
    path, folder = exported["v1"]
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[diffusers\]"'):
        convert_checkpoint(path, "diffusers", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ldm_diffusers.MissingExtraError, match="diffusers"):
        convert_checkpoint(folder, "ours", tmp_path / "back.safetensors")
    # the core (our own format, SD files) does not need it
    assert convert_checkpoint(path, "sd", tmp_path / "sd.safetensors")[0].endswith("sd.safetensors")


def test_txt2img_reads_a_diffusers_folder(exported, tmp_path):
    import numpy as np
    from PIL import Image

    from scripts import txt2img

    path, folder = exported["demo"]
    args = ["--prompt", "a red circle", "--steps", "5", "--seed", "3", "--no-progress"]
    ours = txt2img.main(args + ["--ckpt", path, "--outdir", str(tmp_path / "ours")])[0]
    theirs = txt2img.main(args + ["--ckpt", folder, "--outdir", str(tmp_path / "folder")])[0]
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (ours, theirs))
    assert np.abs(a - b).max() <= 1  # the same model: at most PNG rounding apart
