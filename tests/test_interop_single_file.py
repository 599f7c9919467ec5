"""Original Stable Diffusion single files load into our model and compute what SD (and diffusers) compute.

The files are built here at reduced widths with SD's key names and SD's extra buffers (the schedule tables of
``DDPM.register_schedule`` in float32, LitEma's ``model_ema.*`` names). The loaded model is checked against
independent computations: diffusers' UNet and VAE built by diffusers' own LDM converters from the same state dict,
SD's OpenCLIP text encoding written out below on the raw open_clip model, and diffusers' DDIMScheduler for a
10-step guided sample.
"""

import json
import os
import pickle

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from ldm.checkpoint import load_state_dict as read_state_dict
from ldm.interop import CheckpointFormatError, infer_variant, load_model, load_sd_config
from ldm.models.latent_diffusion import LatentDiffusion

diffusers = pytest.importorskip("diffusers")
from benchmarks import diffusers_compat as dc  # noqa: E402

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3}


def sd_yaml(parameterization="eps", in_channels=4, context_dim=32, cond=None, linear_end=0.012, v1=False):
    """An SD v2-style (or v1-style) original inference config at reduced widths (the text tower's size given as
    model_config)."""
    if v1:  # OpenAI CLIP in Hugging Face's layout, 1x1-conv projections, a fixed head count
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"model_config": {"embed_dim": 32, "quick_gelu": True, "text_cfg": TEXT_CFG}}}
        heads = {"num_heads": 2, "use_linear_in_transformer": False}
    else:
        heads = {"num_head_channels": 16, "use_linear_in_transformer": True}
    cond = cond or {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                    "params": {"freeze": True, "layer": "penultimate",
                               "model_config": {"embed_dim": 32, "text_cfg": TEXT_CFG}}}
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion" if in_channels == 4
        else "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
        "params": {
            "parameterization": parameterization, "linear_start": 0.00085, "linear_end": linear_end, "timesteps": 1000,
            "image_size": 8, "channels": 4, "conditioning_key": "crossattn" if in_channels == 4 else "hybrid",
            "scale_factor": 0.18215, "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "use_checkpoint": True, "use_fp16": True, "image_size": 8, "in_channels": in_channels,
                "out_channels": 4, "model_channels": 32, "attention_resolutions": [1, 2], "num_res_blocks": 1,
                "channel_mult": [1, 2], "use_spatial_transformer": True, **heads,
                "transformer_depth": 1, "context_dim": context_dim, "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": 4, "monitor": "val/rec_loss",
                "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3,
                             "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                             "dropout": 0.0},
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": cond,
        }}}


def sd_schedule_buffers(linear_start=0.00085, linear_end=0.012, timesteps=1000):
    """SD's DDPM.register_schedule, in numpy as SD computes it, stored in float32 as SD does."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    tables = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - alphas_cumprod),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tables.items()}


def build_sd_state_dict(config, seed=0, ema=True):
    """SD-layout weights at the config's widths: random (perturbed, so zero-initialised layers are live), the
    schedule buffers, and LitEma copies of the UNet weights that differ from them."""
    ours = load_sd_config_from_dict(config)
    torch.manual_seed(seed)
    model = LatentDiffusion.from_config(ours)
    dc.perturb_parameters(model, torch.Generator().manual_seed(seed))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update(sd_schedule_buffers(linear_end=config["model"]["params"]["linear_end"]))
    if ema:
        for key, value in list(state.items()):
            if key.startswith("model.diffusion_model."):
                state["model_ema." + key[len("model."):].replace(".", "")] = value + 0.01
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(123, dtype=torch.int32)
    return state


def load_sd_config_from_dict(config):
    from ldm.interop import sd_config_to_ours

    ours = sd_config_to_ours(config)
    ours.pop("variant")
    return ours


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    """{name: (checkpoint path, yaml path, state dict)} for v2-eps (.safetensors), v2-eps (.ckpt) and v2-v."""
    root = tmp_path_factory.mktemp("sd")
    files = {}
    for name, parameterization, suffix in (("v2", "eps", "safetensors"), ("v2-ckpt", "eps", "ckpt"),
                                           ("v2-v", "v", "safetensors"), ("v1", "eps", "ckpt")):
        config = sd_yaml(parameterization, v1=name == "v1")
        state = build_sd_state_dict(config, seed=len(files))
        if name == "v1":  # some SD v1 files carry Hugging Face's position_ids buffer
            state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        path = root / f"{name}.{suffix}"
        if suffix == "safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:  # as SD's training code saves: a Lightning checkpoint with the weights under state_dict
            torch.save({"state_dict": state, "global_step": 1000, "epoch": 3}, path)
        yaml_path = root / f"{name}.yaml"
        yaml_path.write_text(yaml.safe_dump(config))
        files[name] = (str(path), str(yaml_path), state)
    return files


def sd_openclip_context(text_model, texts, layer="penultimate"):
    """SD 2's FrozenOpenCLIPEmbedder.encode, written out on the raw open_clip model (tokens by open_clip.tokenize)."""
    import open_clip

    tokens = open_clip.tokenize(texts)
    x = text_model.token_embedding(tokens) + text_model.positional_embedding
    blocks = text_model.transformer.resblocks
    for block in blocks[: len(blocks) - (1 if layer == "penultimate" else 0)]:
        x = block(x, attn_mask=text_model.attn_mask)
    return text_model.ln_final(x)


# ------------------------------------------------------------------------------------------------ loading


def sd_clip_context(state, tokens):
    """SD 1's FrozenCLIPEmbedder: transformers' CLIPTextModel with the file's weights, last hidden state."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu")).eval()
    prefix = "cond_stage_model.transformer.text_model."
    nested = hasattr(hf, "text_model")  # transformers 4 nests text_model, 5 does not
    missing, unexpected = hf.load_state_dict({("text_model." if nested else "") + k[len(prefix):]: v
                                              for k, v in state.items()
                                              if k.startswith(prefix) and not k.endswith("position_ids")},
                                             strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    return hf(input_ids=tokens).last_hidden_state


@pytest.mark.parametrize("name", ["v2", "v2-ckpt", "v2-v", "v1"])
def test_sd_file_computes_what_sd_and_diffusers_compute(sd_files, name):
    import open_clip

    path, yaml_path, state = sd_files[name]
    config = yaml.safe_load(open(yaml_path))
    model = LatentDiffusion.from_single_file(path, config=yaml_path)
    assert model.parameterization == ("v" if name == "v2-v" else "eps") and model.scale_factor == 0.18215

    texts = ["a red circle", ""]
    with torch.no_grad():
        context = model.encode_text(texts)
        if name == "v1":  # transformers' CLIP text model with the file's Hugging Face-layout weights
            tokens = model.cond_stage_model.tokenize(texts)
            assert tokens[1, 2:].eq(49407).all()  # SD 1 pads with the end-of-text token
            expected = sd_clip_context(state, tokens)
        else:  # SD 2's encoding on the raw open_clip tower holding the file's weights
            clip = open_clip.CLIP(32, vision_cfg={"image_size": 8, "layers": 1, "width": 64, "patch_size": 8},
                                  text_cfg=TEXT_CFG)
            del clip.visual
            clip.load_state_dict({k[len("cond_stage_model.model."):]: v for k, v in state.items()
                                  if k.startswith("cond_stage_model.model.")}, strict=True)
            expected = sd_openclip_context(clip.eval(), texts)
    torch.testing.assert_close(context, expected, atol=1e-5, rtol=1e-5)

    # UNet and VAE: diffusers' modules made by diffusers' converters from the file's own state dict
    unet_params = config["model"]["params"]["unet_config"]["params"]
    unet_sd = {k[len("model.diffusion_model."):]: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    theirs = dc.to_diffusers_unet(unet_params, unet_sd)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(model.model_fn(x, t, context), theirs(x, t, encoder_hidden_states=context).sample,
                                   atol=1e-4, rtol=1e-4)
        ddconfig = config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
        vae_sd = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
        vae = dc.to_diffusers_vae(ddconfig, 4, vae_sd)
        torch.testing.assert_close(model.decode_latents(x * 0.18215), vae.decode(x).sample, atol=1e-4, rtol=1e-4)

        # 10 DDIM steps with guidance 5 against diffusers' DDIMScheduler (SD's leading spacing, offset 1)
        x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        ours = model.sample(["a red circle"], {"name": "ddim", "num_steps": 10}, guidance_scale=5.0, x_T=x_T,
                            decode=False, progress=False)
        scheduler = dc.diffusers_ddim_scheduler(load_sd_config(yaml_path)["schedule"]["params"],
                                                model.parameterization)
        scheduler.set_timesteps(10)
        latents = x_T.clone()
        cond = torch.cat([model.encode_text([""]), model.encode_text(["a red circle"])])
        for step in scheduler.timesteps:
            out = theirs(latents.repeat(2, 1, 1, 1), step, encoder_hidden_states=cond).sample
            uncond, text = out.chunk(2)
            latents = scheduler.step(uncond + 5.0 * (text - uncond), step, latents).prev_sample
    torch.testing.assert_close(ours, latents, atol=1e-4, rtol=1e-4)


def test_ema_weights_with_use_ema_and_dropped_without(sd_files):
    path, yaml_path, state = sd_files["v2"]
    key = "model.diffusion_model.input_blocks.0.0.weight"
    plain = LatentDiffusion.from_single_file(path, config=yaml_path)
    ema = LatentDiffusion.from_single_file(path, config=yaml_path, use_ema=True)
    assert torch.equal(plain.state_dict()[key], state[key])
    assert torch.equal(ema.state_dict()[key], state["model_ema.diffusion_modelinput_blocks00weight"])
    # the EMA replaces only the UNet: the VAE and text weights are the file's
    vae_key = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(ema.state_dict()[vae_key], state[vae_key])


def test_a_file_read_by_content_not_by_name(sd_files, tmp_path):
    path, yaml_path, state = sd_files["v2-ckpt"]
    renamed = tmp_path / "really-a-ckpt.safetensors"
    renamed.write_bytes(open(path, "rb").read())
    assert read_state_dict(renamed).keys() == state.keys()
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(LatentDiffusion.from_single_file(renamed, config=yaml_path).state_dict()[key], state[key])
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not a model\n" * 10)
    with pytest.raises(CheckpointFormatError, match="notes.safetensors: not a model file"):
        read_state_dict(text)


def test_our_own_files_and_sd_files_through_one_entry_point(sd_files, trained):
    ours = load_model(trained[0])
    assert isinstance(ours, LatentDiffusion) and ours.config["unet"]["params"]["model_channels"] == 32
    path, yaml_path, _ = sd_files["v2-v"]
    sd = load_model(path, config=yaml_path)
    assert sd.parameterization == "v"
    with pytest.raises(ValueError, match="contradicts"):
        load_model(trained[0], parameterization="eps")


def test_txt2img_samples_from_an_sd_file(sd_files, tmp_path):
    from PIL import Image

    from scripts import txt2img

    path, yaml_path, _ = sd_files["v2"]
    written = txt2img.main(["--prompt", "a red circle", "--ckpt", path, "--config", yaml_path, "--steps", "3",
                            "--outdir", str(tmp_path), "--no-progress", "--use-ema"])
    assert len(written) == 1
    assert Image.open(written[0]).size == (16, 16)  # the config's image_size: 8 latents x factor 2


# ------------------------------------------------------------------------------------------------ variants


def test_variant_is_read_off_the_weights():
    def shapes(in_channels, text):
        sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, in_channels, 3, 3)}
        sd[text] = torch.empty(1)
        return sd

    assert infer_variant(shapes(4, "cond_stage_model.transformer.text_model.final_layer_norm.weight")) == "v1-inference"
    assert infer_variant(shapes(4, "cond_stage_model.model.ln_final.weight")) == "v2-inference"
    assert infer_variant(shapes(9, "cond_stage_model.model.ln_final.weight")) == "v2-inpainting-inference"
    assert infer_variant(shapes(9, "cond_stage_model.transformer.x")) == "v1-inpainting-inference"
    with pytest.raises(CheckpointFormatError, match="VAE-only"):
        infer_variant({"first_stage_model.decoder.conv_out.weight": torch.empty(1)})


def test_without_a_config_the_stock_one_is_used_and_a_size_mismatch_is_named(sd_files):
    path, _, _ = sd_files["v2"]
    # the tiny file is not SD 2's size: the stock v2 config is picked and the mismatch named
    with pytest.raises(CheckpointFormatError, match=r"does not fit its config.*shape\(s\) differ"):
        LatentDiffusion.from_single_file(path)


def test_every_stock_config_maps():
    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "stable-diffusion")
    expected = {"v1-inference.yaml": ("eps", "ViT-L-14-quickgelu", 4, 768), "v2-inference.yaml": ("eps", "ViT-H-14", 4, 1024),
                "v2-inference-v.yaml": ("v", "ViT-H-14", 4, 1024),
                "v1-inpainting-inference.yaml": ("eps", "ViT-L-14-quickgelu", 9, 768),
                "v2-inpainting-inference.yaml": ("eps", "ViT-H-14", 9, 1024)}
    assert sorted(os.listdir(root)) == sorted(expected)
    for name, (param, arch, in_channels, context) in expected.items():
        ours = load_sd_config(os.path.join(root, name))
        unet = ours["unet"]["params"]
        assert (ours["parameterization"], ours["text_encoder"]["params"]["arch"], unet["in_channels"],
                unet["context_dim"]) == (param, arch, in_channels, context)
        # SD's "linear" is linear in sqrt(beta): our scaled_linear with SD's endpoints
        assert ours["schedule"]["params"] == {"kind": "scaled_linear", "num_timesteps": 1000,
                                              "beta_start": 0.00085, "beta_end": 0.012}
        assert ours["scale_factor"] == 0.18215


# ------------------------------------------------------------------------------------------------ bad files


def test_a_file_trained_with_another_schedule_is_refused_naming_the_table(sd_files, tmp_path):
    path, yaml_path, _ = sd_files["v2"]
    other = yaml.safe_load(open(yaml_path))
    other["model"]["params"]["linear_end"] = 0.02
    other_path = tmp_path / "other.yaml"
    other_path.write_text(yaml.safe_dump(other))
    with pytest.raises(CheckpointFormatError, match="schedule table 'betas' differs"):
        LatentDiffusion.from_single_file(path, config=other_path)


def test_bad_files_get_one_clear_error(sd_files, tmp_path):
    path, yaml_path, state = sd_files["v2"]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(path, "rb").read()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        LatentDiffusion.from_single_file(truncated, config=yaml_path)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as handle:
        pickle.dump({"state_dict": {"w": Evil()}}, handle, protocol=2)
    with pytest.raises(CheckpointFormatError, match="weights_only=True"):
        LatentDiffusion.from_single_file(evil, config=yaml_path)
    zipped = tmp_path / "evil-zip.ckpt"
    torch.save({"state_dict": {"w": Evil()}}, zipped)
    with pytest.raises(CheckpointFormatError, match="never pickled code"):
        LatentDiffusion.from_single_file(zipped, config=yaml_path)
    assert not marker.exists()

    vae_only = tmp_path / "vae.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("first_stage_model.")}, str(vae_only))
    with pytest.raises(CheckpointFormatError, match="VAE-only"):
        LatentDiffusion.from_single_file(vae_only)
    with pytest.raises(CheckpointFormatError, match="missing from the file"):
        LatentDiffusion.from_single_file(vae_only, config=yaml_path)

    # a config naming a class the loader does not map is refused without importing anything
    hostile = yaml.safe_load(open(yaml_path))
    hostile["model"]["params"]["cond_stage_config"] = {"target": "os.system", "params": {"command": f"touch {marker}"}}
    with pytest.raises(ValueError, match="'os.system' is not a Stable Diffusion class"):
        LatentDiffusion.from_single_file(path, config=hostile)
    assert not marker.exists()


def test_fine_tuning_starts_from_an_sd_file_and_keeps_its_schedule(sd_files, tmp_path):
    from safetensors.torch import load_file

    from scripts import train_diffusion
    from tests.helpers import TINY_DIFFUSION_CONFIG

    path, yaml_path, state = sd_files["v2-v"]
    out = train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--init-from", path, "--config-from", yaml_path,
                                "--run-dir", str(tmp_path / "run"), "--max-steps", "2",
                                "trainer.params.learning_rate=0.0", "lightning.image_every=100"])
    exported = LatentDiffusion.from_checkpoint(out)
    assert exported.parameterization == "v" and exported.scale_factor == 0.18215
    assert exported.config["schedule"]["params"]["beta_end"] == 0.012
    weights = load_file(out)
    for key, value in weights.items():  # learning rate 0: every weight is still the SD file's
        assert torch.equal(value, state[key]), key
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["unet"]["params"]["context_dim"] == 32  # the run says what it trains: the SD model


# ------------------------------------------------------------------------------------------------ export


def test_ours_to_sd_to_ours_is_bit_equal_and_diffusers_reads_the_sd_file(tmp_path):
    from safetensors.torch import load_file

    from ldm.assets import DEMO_CHECKPOINT
    from scripts import convert_checkpoint

    sd_path, yaml_path = convert_checkpoint.main(["--ckpt", DEMO_CHECKPOINT, "--to", "sd",
                                                  "--out", str(tmp_path / "demo-sd.safetensors")])
    assert yaml_path == str(tmp_path / "demo-sd.yaml")
    sd_config = yaml.safe_load(open(yaml_path))
    assert sd_config["model"]["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert sd_config["model"]["params"]["parameterization"] == "v"
    sd_state = load_file(sd_path)
    original = LatentDiffusion.from_checkpoint(DEMO_CHECKPOINT)
    own = original.state_dict()
    # exactly what SD's LatentDiffusion holds: the weights plus its twelve schedule buffers, nothing else
    assert set(sd_state) - set(own) == {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                                        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                                        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                                        "posterior_variance", "posterior_log_variance_clipped",
                                        "posterior_mean_coef1", "posterior_mean_coef2"}
    torch.testing.assert_close(sd_state["alphas_cumprod"].double(), original.schedule.alphas_cumprod.double(),
                               rtol=1e-6, atol=0)

    back = convert_checkpoint.main(["--ckpt", sd_path, "--config", yaml_path, "--to", "ours",
                                    "--out", str(tmp_path / "back.safetensors")])[0]
    again = LatentDiffusion.from_checkpoint(back)
    assert again.parameterization == original.parameterization and again.scale_factor == original.scale_factor
    assert again.state_dict().keys() == own.keys()
    for key, value in again.state_dict().items():
        assert torch.equal(value, own[key]), key
    prompts = ["a red circle"]
    torch.testing.assert_close(again.encode_text(prompts), original.encode_text(prompts), rtol=0, atol=0)

    # an independent reader of SD files: diffusers builds the UNet from the file and its YAML
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_single_file(sd_path, original_config=yaml_path).eval()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    context = original.encode_text(prompts)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=context).sample,
                                   original.model_fn(x, t, context), atol=1e-4, rtol=1e-4)


def test_sd_to_ours_to_sd_keeps_every_weight(sd_files, tmp_path):
    from safetensors.torch import load_file

    from ldm.interop.export import convert_checkpoint

    path, yaml_path, state = sd_files["v2-ckpt"]
    ours = convert_checkpoint(path, "ours", tmp_path / "ours.safetensors", config=yaml_path)[0]
    sd_path, back_yaml = convert_checkpoint(ours, "sd", tmp_path / "back.safetensors")
    back = load_file(sd_path)
    assert set(back) == {k for k in state if not k.startswith("model_ema.")}
    for key, value in back.items():
        if key in state and key.startswith(("model.", "first_stage_model.", "cond_stage_model.")):
            assert torch.equal(value, state[key]), key
        else:  # a schedule table: SD computes it in numpy, we in torch (float64 both, stored float32)
            torch.testing.assert_close(value, state[key], rtol=1e-6, atol=0)
    assert load_sd_config(back_yaml) == load_sd_config(yaml_path)


def test_an_ema_only_file_loads_its_ema_weights(sd_files, tmp_path):
    path, yaml_path, state = sd_files["v2"]
    ema_only = {k: v for k, v in state.items() if not k.startswith("model.diffusion_model.")}
    file = tmp_path / "ema-only.safetensors"
    save_file(ema_only, str(file))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    model = LatentDiffusion.from_single_file(file, config=yaml_path)
    assert torch.equal(model.state_dict()[key], state["model_ema.diffusion_modelinput_blocks00weight"])


def test_a_v1_file_with_a_v2_config_names_what_differs(sd_files):
    path, _, _ = sd_files["v1"]
    _, v2_yaml, _ = sd_files["v2"]
    with pytest.raises(CheckpointFormatError, match=r"does not fit its config.*cond_stage_model\.(model|transformer)"):
        LatentDiffusion.from_single_file(path, config=v2_yaml)


def test_an_inpainting_file_loads_with_its_nine_channel_unet(tmp_path):
    config = sd_yaml(in_channels=9)
    state = build_sd_state_dict(config, ema=False)
    path = tmp_path / "inpaint.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    yaml_path = tmp_path / "inpaint.yaml"
    yaml_path.write_text(yaml.safe_dump(config))
    model = LatentDiffusion.from_single_file(path, config=yaml_path)
    assert model.config["inpainting"] is True and model.unet.in_channels == 9
    assert infer_variant(state) == "v2-inpainting-inference"
