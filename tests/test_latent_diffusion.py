"""The composed text-to-image model, its training module and script, and txt2img, on tiny models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm.checkpoint import read_safetensors_metadata
from ldm.models.diffusion_trainer import DiffusionTrainer
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.util import ConfigError, load_config, to_container
from scripts import train_diffusion, txt2img
from tests.helpers import TINY_DIFFUSION_CONFIG as CONFIG
from tests.helpers import TinyCaptionedImages


def build_tiny_model(autoencoder_file) -> LatentDiffusion:
    torch.manual_seed(0)
    return train_diffusion.build_model(to_container(load_config(CONFIG).model), autoencoder_file)


def test_state_dict_follows_stable_diffusion_prefixes(autoencoder_file):
    model = build_tiny_model(autoencoder_file)
    prefixes = {key.split(".")[0] for key in model.state_dict()}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert any(key.startswith("model.diffusion_model.input_blocks.0.0.") for key in model.state_dict())
    assert model.scale_factor == pytest.approx(0.7)


def test_latents_are_scaled_autoencoder_latents(autoencoder_file):
    model = build_tiny_model(autoencoder_file)
    images = TinyCaptionedImages(2)[0]["image"][None]
    expected = model.first_stage_model.encode(images).mode() * 0.7
    torch.testing.assert_close(model.encode_images(images, sample=False), expected)
    torch.testing.assert_close(model.decode_latents(expected), model.first_stage_model.decode(expected / 0.7))


def test_training_steps_lower_the_loss_on_a_fixed_batch(autoencoder_file):
    from ldm.diffusion import diffusion_loss

    model = build_tiny_model(autoencoder_file)
    module = DiffusionTrainer(model, learning_rate=2e-3, warmup_steps=1, p_uncond=0.0, ema_decay=None)
    data = TinyCaptionedImages(8)
    images = torch.stack([data[i]["image"] for i in range(8)])
    captions = [data[i]["caption"] for i in range(8)]
    latents = model.encode_images(images, sample=False)
    context = model.encode_text(captions)
    t = torch.randint(0, 100, (8,), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))

    def fixed_loss():
        return diffusion_loss(model.model_fn, model.schedule, latents, cond=context, noise=noise, t=t)

    optimizer = module.configure_optimizers()["optimizer"]
    with torch.no_grad():
        before = fixed_loss().item()
    for _ in range(25):
        optimizer.zero_grad()
        fixed_loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = fixed_loss().item()
    assert after < 0.7 * before, (before, after)
    frozen = [p for name, p in model.named_parameters() if not name.startswith("model.diffusion_model")]
    assert frozen and all(p.grad is None for p in frozen)


def test_batch_without_configured_keys_names_the_keys_it_has(autoencoder_file):
    module = DiffusionTrainer(build_tiny_model(autoencoder_file), ema_decay=None)
    with pytest.raises(KeyError, match=r"'pixels'.*'text'"):
        module.training_step({"pixels": torch.zeros(1, 3, 16, 16), "text": ["x"]}, 0)


def test_caption_dropout_rate(autoencoder_file):
    module = DiffusionTrainer(build_tiny_model(autoencoder_file), p_uncond=0.25, ema_decay=None)
    dropped = module.drop_captions(["a red circle"] * 20000)
    rate = dropped.count("") / len(dropped)
    assert abs(rate - 0.25) < 4 * (0.25 * 0.75 / 20000) ** 0.5


def test_script_writes_run_folder_and_one_file_rebuilds_the_model(trained):
    weights, run_dir = trained
    assert os.path.isfile(run_dir / "config.yaml")
    assert os.path.isfile(run_dir / "checkpoints" / "last.ckpt")
    assert any(name.startswith("samples_step") for name in os.listdir(run_dir / "images"))
    metrics = open(next((run_dir / "logs").rglob("metrics.csv"))).read()
    assert "val/loss" in metrics.splitlines()[0] and "train/loss" in metrics.splitlines()[0]
    model = LatentDiffusion.from_checkpoint(weights)
    assert set(model.config) >= {"autoencoder", "text_encoder", "unet", "schedule", "scale_factor"}
    assert model.scale_factor == pytest.approx(0.7)


def test_exported_unet_is_the_ema_copy_and_checkpoint_holds_one_of_each(trained):
    weights, run_dir = trained
    exported = load_file(weights)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    key = "model.diffusion_model.out.2.weight"
    ema_keys = [k for k in checkpoint if k.startswith("model_ema.") and k.endswith("diffusion_modelout2weight")]
    assert len(ema_keys) == 1, ema_keys
    raw, ema = checkpoint["model." + key], checkpoint[ema_keys[0]]
    assert not torch.equal(raw, ema)  # after 4 steps at decay <= 0.99 they differ
    torch.testing.assert_close(exported[key], ema)
    assert sum(k.endswith(".out.2.weight") and "diffusion_model" in k for k in checkpoint) == 1


def test_resume_continues_the_step_count(trained, autoencoder_file, tmp_path):
    import shutil

    run_dir = shutil.copytree(trained[1], tmp_path / "run")  # the shared run stays as the fixture made it
    resumed = train_diffusion.main(
        ["--config", CONFIG, "--autoencoder", autoencoder_file, "--resume", str(run_dir / "checkpoints" / "last.ckpt"),
         "--max-steps", "6"]
    )
    assert os.path.dirname(resumed) == str(run_dir)
    assert int(read_safetensors_metadata(resumed)["global_step"]) == 6


def test_txt2img_writes_pngs_with_metadata_and_is_reproducible(trained, tmp_path):
    weights, _ = trained
    args = ["--prompt", "a red square", "--ckpt", weights, "--steps", "3", "--seed", "7", "--n-samples", "2",
            "--no-progress"]
    first = txt2img.main(args + ["--outdir", str(tmp_path / "a")])
    second = txt2img.main(args + ["--outdir", str(tmp_path / "b")])
    assert len(first) == 2 and os.path.isfile(tmp_path / "a" / "grid.png")
    image = Image.open(first[0])
    assert image.size == (16, 16)
    assert image.text["prompt"] == "a red square"
    assert json.loads(image.text["parameters"])["seed"] == 7
    for a, b in zip(first, second):
        assert (torch.tensor(list(Image.open(a).getdata())) == torch.tensor(list(Image.open(b).getdata()))).all()
    other = txt2img.main(["--prompt", "a red square", "--ckpt", weights, "--steps", "3", "--seed", "8",
                          "--no-progress", "--outdir", str(tmp_path / "c")])
    assert list(Image.open(other[0]).getdata()) != list(Image.open(first[0]).getdata())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--height", "10"], "multiples of 4"),
        (["--sampler", "plms"], "unknown sampler"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    ],
)
def test_txt2img_rejects_bad_settings_before_work(trained, tmp_path, flags, message):
    weights, _ = trained
    with pytest.raises(SystemExit, match=message):
        txt2img.main(["--prompt", "x", "--ckpt", weights, "--outdir", str(tmp_path)] + flags)
    assert not os.path.exists(tmp_path / "grid.png")


def test_checkpoint_that_does_not_fit_its_config_is_refused(trained, tmp_path):
    from ldm.checkpoint import load_state_dict, save_safetensors

    weights, _ = trained
    state = load_state_dict(weights)
    state.pop("model.diffusion_model.out.2.bias")
    broken = tmp_path / "broken.safetensors"
    save_safetensors(broken, state, metadata=read_safetensors_metadata(weights))
    with pytest.raises(ValueError, match=r"does not fit.*out\.2\.bias"):
        LatentDiffusion.from_checkpoint(broken)


def test_export_from_a_checkpoint_equals_the_training_export(trained, autoencoder_file, tmp_path):
    from scripts import export_diffusion

    weights, run_dir = trained
    out = export_diffusion.main(["--run", str(run_dir), "--autoencoder", autoencoder_file,
                                 "--ckpt", str(run_dir / "checkpoints" / "step000004.ckpt"),
                                 "--out", str(tmp_path / "m.safetensors")])
    exported, reference = load_file(out), load_file(weights)
    assert exported.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(exported[key], reference[key], rtol=0, atol=0)
    earlier = export_diffusion.main(["--run", str(run_dir), "--autoencoder", autoencoder_file, "--ckpt",
                                     str(run_dir / "checkpoints" / "step000002.ckpt"),
                                     "--out", str(tmp_path / "early.safetensors"), "--dtype", "float16"])
    assert int(read_safetensors_metadata(earlier)["global_step"]) == 2
    assert load_file(earlier)["model.diffusion_model.out.2.weight"].dtype == torch.float16


def test_export_raw_weights_are_the_checkpoints_unaveraged_ones(trained, autoencoder_file, tmp_path):
    from scripts import export_diffusion

    _, run_dir = trained
    ckpt = run_dir / "checkpoints" / "step000004.ckpt"
    common = ["--run", str(run_dir), "--autoencoder", autoencoder_file, "--ckpt", str(ckpt)]
    raw = load_file(export_diffusion.main(common + ["--out", str(tmp_path / "raw.safetensors"), "--weights", "raw"]))
    ema = load_file(export_diffusion.main(common + ["--out", str(tmp_path / "ema.safetensors")]))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    unet_keys = [key for key in raw if key.startswith("model.diffusion_model.")]
    assert unet_keys and raw.keys() == ema.keys()
    for key in unet_keys:  # the trainer holds the LatentDiffusion as `model`
        torch.testing.assert_close(raw[key], state["model." + key], rtol=0, atol=0)
    assert any(not torch.equal(raw[key], ema[key]) for key in unet_keys)
    with pytest.raises(SystemExit):
        export_diffusion.main(common + ["--weights", "average"])


def test_ctrl_c_exports_the_weights_learnt_so_far(autoencoder_file, tmp_path, monkeypatch):
    import pytorch_lightning as pl

    class InterruptAtStep3(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                raise KeyboardInterrupt

    from ldm import training

    build = training.build_trainer
    monkeypatch.setattr(training, "build_trainer", lambda *a, **k: build(*a, extra_callbacks=[InterruptAtStep3()], **k))
    weights = train_diffusion.main(["--config", CONFIG, "--autoencoder", autoencoder_file, "--run-dir",
                                    str(tmp_path), "--max-steps", "10"])
    assert int(read_safetensors_metadata(weights)["global_step"]) == 3


def test_init_from_starts_every_weight_from_a_trained_model(trained, tmp_path):
    weights, _ = trained
    out = train_diffusion.main(["--config", CONFIG, "--init-from", weights, "--run-dir", str(tmp_path), "--max-steps",
                                "2", "trainer.params.learning_rate=0.0", "lightning.image_every=100"])
    start, after = load_file(weights), load_file(out)
    assert start.keys() == after.keys()
    for key in start:  # learning rate 0: nothing moved, so the export is the file it started from
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=0)
    assert LatentDiffusion.from_checkpoint(out).scale_factor == pytest.approx(0.7)


def test_init_from_and_autoencoder_are_exclusive(trained, autoencoder_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folder is runs/<config>-<time> under the working directory
    with pytest.raises(ValueError, match="exactly one"):
        train_diffusion.main(["--config", CONFIG, "--init-from", trained[0], "--autoencoder", autoencoder_file])
    with pytest.raises(ValueError, match="not a whole-model file"):
        train_diffusion.main(["--config", CONFIG, "--init-from", autoencoder_file])
    assert not os.path.exists(tmp_path / "runs")  # refused before any run folder was made


def test_config_gradient_clipping_reaches_the_trainer(autoencoder_file, tmp_path, monkeypatch):
    from ldm import training

    seen = {}
    build = training.build_trainer

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return build(*args, **kwargs)

    monkeypatch.setattr(training, "build_trainer", spy)
    train_diffusion.main(["--config", CONFIG, "--autoencoder", autoencoder_file, "--run-dir", str(tmp_path),
                          "--max-steps", "1", "lightning.gradient_clip_val=0.5"])
    assert seen["gradient_clip_val"] == 0.5


def test_warmup_then_cosine_learning_rate_closed_form():
    from ldm.models.diffusion_trainer import warmup_lr_factor

    assert [warmup_lr_factor(step, 4) for step in (0, 1, 3, 4, 10_000)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    # cosine from step 4 to 104, floor 0.1: half way is 0.1 + 0.9 * (1 + cos(pi/2)) / 2 = 0.55
    cosine = [warmup_lr_factor(step, 4, "cosine", 104, 0.1) for step in (0, 4, 54, 104, 500)]
    assert cosine == pytest.approx([0.25, 1.0, 0.55, 0.1, 0.1])
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        warmup_lr_factor(10, 4, "linear", 100)
    with pytest.raises(ValueError, match="needs the total number of steps"):
        warmup_lr_factor(10, 4, "cosine", None)
    assert warmup_lr_factor(0, 1, "cosine", 1) == 1.0  # a 1-step run with 1 warm-up step: no decay to do


def test_training_run_follows_the_configured_cosine_learning_rate(trained):
    """The tiny config: lr 1e-3, warm-up 1 step, cosine to 0.1x at max_steps 4, logged before each step."""
    import csv
    import math

    _, run_dir = trained
    rows = list(csv.DictReader(open(next((run_dir / "logs").rglob("metrics.csv")))))
    logged = [float(row["lr"]) for row in rows if row.get("lr")]
    expected = [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))) for p in (0, 0, 1 / 3, 2 / 3)]
    assert logged == pytest.approx(expected)


def test_model_sampler_defaults_survive_export_and_yield_to_explicit_settings(trained):
    model = LatentDiffusion.from_checkpoint(trained[0])  # tiny config: cosine over 100 steps, ddim trailing
    assert model.sampler_defaults == {"ddim": {"timestep_spacing": "trailing"}}
    assert model.build_sampler({"name": "ddim", "num_steps": 4}).timesteps.tolist() == [99, 74, 49, 24]
    leading = model.build_sampler({"name": "ddim", "num_steps": 4, "timestep_spacing": "leading"})
    assert leading.timesteps.tolist() == [76, 51, 26, 1]
    assert model.build_sampler("ddpm").timesteps.tolist() == list(range(99, -1, -1))  # no defaults for ddpm


def test_last_step_off_the_checkpoint_grid_is_checkpointed(trained, autoencoder_file, tmp_path):
    """max_steps 3 with checkpoint_every 2: step 3 is saved too (as step000003.ckpt and last.ckpt)."""
    train_diffusion.main(["--config", CONFIG, "--autoencoder", autoencoder_file, "--run-dir", str(tmp_path),
                          "--max-steps", "3"])
    checkpoints = tmp_path / "checkpoints"
    assert {"step000002.ckpt", "step000003.ckpt", "last.ckpt"} <= set(os.listdir(checkpoints))
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3


def test_trainable_text_encoder_is_trained_averaged_and_exported(trained, tmp_path):
    weights, _ = trained
    out = train_diffusion.main(["--config", CONFIG, "--init-from", weights, "--run-dir", str(tmp_path), "--max-steps",
                                "3", "model.text_encoder.params.freeze=false",
                                "trainer.params.cond_stage_trainable=true", "lightning.image_every=100"])
    start, after = load_file(weights), load_file(out)
    text_keys = [k for k in start if k.startswith("cond_stage_model.")]
    moved = [k for k in text_keys if not torch.equal(start[k], after[k])]
    assert "cond_stage_model.model.positional_embedding" in moved and len(moved) > len(text_keys) // 2
    for key in (k for k in start if k.startswith("first_stage_model.")):
        assert torch.equal(start[key], after[key]), key

    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    ema_keys = [k for k in checkpoint if k.startswith("cond_stage_ema.") and k.endswith("positional_embedding")]
    assert len(ema_keys) == 1, ema_keys
    raw = checkpoint["model.cond_stage_model.model.positional_embedding"]
    assert not torch.equal(raw, checkpoint[ema_keys[0]])
    torch.testing.assert_close(after["cond_stage_model.model.positional_embedding"], checkpoint[ema_keys[0]])

    from scripts import export_diffusion

    exported = load_file(export_diffusion.main(["--run", str(tmp_path), "--init-from", weights,
                                                "--out", str(tmp_path / "re-export.safetensors")]))
    assert exported.keys() == after.keys()
    for key in after:  # the export script rebuilds the trainable encoder and its EMA from the run's config
        torch.testing.assert_close(exported[key], after[key], rtol=0, atol=0)


def test_trainable_text_encoder_must_be_built_unfrozen(autoencoder_file):
    with pytest.raises(ValueError, match="text_encoder.params.freeze: false"):
        DiffusionTrainer(build_tiny_model(autoencoder_file), cond_stage_trainable=True)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # a step into warm-up
def test_text_encoder_learning_rate_factor_scales_its_updates_only(autoencoder_file):
    """The tower's own param group: AdamW's step is proportional to the rate (the first step is -lr * (g / |g| +
    wd * p)), so with the same gradients its update is exactly cond_stage_lr_factor times the one-group update
    while the UNet's is unchanged, through warm-up and after a resume re-applies the base rate."""
    from types import SimpleNamespace

    from ldm.training import set_base_learning_rate

    def one_step(factor, new_base=None):
        torch.manual_seed(0)
        model = build_tiny_model(autoencoder_file)
        model.cond_stage_model.requires_grad_(True)
        module = DiffusionTrainer(model, learning_rate=1e-2, warmup_steps=4, cond_stage_trainable=True,
                                  cond_stage_lr_factor=factor)
        config = module.configure_optimizers()
        optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        scheduler.step()
        if new_base is not None:  # as on --resume with a changed trainer.params.learning_rate
            trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)],
                                      optimizers=[optimizer])
            set_base_learning_rate(trainer, new_base)
        before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        return optimizer, {name: p.detach() - before[name] for name, p in model.named_parameters() if name in before}

    for new_base in (None, 3e-2):
        single, reference = one_step(1.0, new_base)
        split, scaled = one_step(0.1, new_base)
        assert len(single.param_groups) == 1 and [g.get("lr_factor", 1.0) for g in split.param_groups] == [1.0, 0.1]
        assert split.param_groups[1]["lr"] == pytest.approx(0.1 * split.param_groups[0]["lr"])
        tower = [name for name in reference if name.startswith("cond_stage_model.")]
        assert tower and len(tower) < len(reference)
        for name in reference:
            factor = 0.1 if name.startswith("cond_stage_model.") else 1.0
            torch.testing.assert_close(scaled[name], factor * reference[name], rtol=1e-4, atol=1e-6)


def test_text_encoder_learning_rate_factor_needs_a_trained_encoder(autoencoder_file):
    with pytest.raises(ValueError, match="cond_stage_trainable: true"):
        DiffusionTrainer(build_tiny_model(autoencoder_file), cond_stage_lr_factor=0.1)
    model = build_tiny_model(autoencoder_file)
    model.cond_stage_model.requires_grad_(True)
    with pytest.raises(ValueError, match="cond_stage_lr_factor must be > 0, got 0"):
        DiffusionTrainer(model, cond_stage_trainable=True, cond_stage_lr_factor=0)


def test_empty_prompt_context_follows_a_trainable_text_encoder(autoencoder_file):
    model = build_tiny_model(autoencoder_file)
    frozen_context = model.empty_context(1).clone()
    model.cond_stage_model.model.positional_embedding.data += 1.0
    torch.testing.assert_close(model.empty_context(1), frozen_context)  # frozen: computed once
    model.cond_stage_model.requires_grad_(True)
    changed = model.empty_context(2)
    assert changed.shape[0] == 2 and not torch.allclose(changed[0], frozen_context[0])
    torch.testing.assert_close(changed[0], model.encode_text([""])[0])


def test_high_noise_band_draws_training_timesteps_but_not_validation_ones(autoencoder_file):
    model = build_tiny_model(autoencoder_file)
    seen = []
    model_fn = model.model_fn

    def recording_model_fn(x, t, cond):
        seen.append(t.clone())
        return model_fn(x, t, cond)

    model.model_fn = recording_model_fn
    module = DiffusionTrainer(model, ema_decay=None, high_noise_prob=1.0, high_noise_from=90)
    data = TinyCaptionedImages(8)
    batch = {"image": torch.stack([data[i]["image"] for i in range(8)]), "caption": [data[i]["caption"] for i in range(8)]}
    for _ in range(5):
        module.batch_loss(batch, training=True)
    trained_t = torch.cat(seen)
    assert trained_t.min() >= 90 and trained_t.max() <= model.schedule.num_timesteps - 1
    assert len(trained_t.unique()) > 1
    seen.clear()
    module.batch_loss(batch, training=False, generator=torch.Generator().manual_seed(0))
    assert seen[0].min() < 90  # validation stays uniform: 8 draws all >= 90 have probability 1e-8


def test_high_noise_band_needs_its_start(autoencoder_file):
    with pytest.raises(ValueError, match="high_noise_from"):
        DiffusionTrainer(build_tiny_model(autoencoder_file), ema_decay=None, high_noise_prob=0.3)


@pytest.mark.parametrize(
    "config_path",
    ["configs/latent-diffusion/shapes-small.yaml", "configs/latent-diffusion/shapes-small-eps.yaml",
     "configs/latent-diffusion/shapes.yaml", "configs/demo/diffusion.yaml", "configs/demo/diffusion-30min.yaml"],
)
def test_shipped_diffusion_configs_build_their_model_trainer_and_data(config_path, autoencoder_file):
    """Every key in the repository's configs is one the code takes (a misspelt key would raise here)."""
    from ldm.training import build_dataloaders
    from ldm.util import instantiate_from_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, config_path))
    train_diffusion.check_config(config)
    model = train_diffusion.build_model(to_container(config.model), autoencoder_file)
    module = instantiate_from_config(config.trainer, path="trainer", model=model)
    assert isinstance(module, DiffusionTrainer)
    train_params = config.data.train.params
    if module.timestep_density is not None:
        band = module.timestep_density[config.trainer.params.high_noise_from:].sum().item()
        assert band > config.trainer.params.high_noise_prob
    train_loader, _ = build_dataloaders(config.data)
    assert train_loader.dataset.two_object_prob == train_params.get("two_object_prob", 0.5)


def test_compiled_unet_trains_like_the_plain_one_and_leaves_checkpoint_keys_alone(autoencoder_file):
    graphs = []

    def counting_backend(gm, example_inputs):  # what torch.compile hands a backend: run the graph as traced
        graphs.append(gm)
        return gm.forward

    batch = {"image": torch.stack([TinyCaptionedImages(4)[i]["image"] for i in range(4)]),
             "caption": ["a red square", "a blue circle", "", "a green triangle"]}
    results = []
    for compile_unet in (False, {"backend": counting_backend}):
        module = DiffusionTrainer(build_tiny_model(autoencoder_file), p_uncond=0.0, compile_unet=compile_unet)
        module.train()
        torch.manual_seed(5)
        loss = module.batch_loss(batch, training=True)[0]
        loss.backward()
        grads = [p.grad.clone() for p in module.model.unet.parameters()]
        results.append((loss.item(), grads, sorted(module.state_dict())))
        if compile_unet:
            assert graphs, "the training forward did not go through torch.compile"
            traced = len(graphs)
            with torch.no_grad():  # validation and sampling use the plain module: no new graph for no-grad mode
                module.batch_loss(batch, training=False, generator=torch.Generator().manual_seed(0))
            assert len(graphs) == traced
    (plain_loss, plain_grads, plain_keys), (loss, grads, keys) = results
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert keys == plain_keys and not any("_orig_mod" in key for key in keys)


def test_compile_unet_refuses_a_value_it_cannot_use(autoencoder_file):
    with pytest.raises(ValueError, match="compile_unet"):
        DiffusionTrainer(build_tiny_model(autoencoder_file), compile_unet="max-autotune")


def _pooled_model_config(**unet_overrides):
    config = to_container(load_config(CONFIG).model)
    config["pooled_context"] = "mean"
    config["unet"]["params"].update({"num_classes": "sequential", "adm_in_channels": 16, **unet_overrides})
    return config


def test_pooled_context_gives_every_resblock_the_mean_of_the_prompt(autoencoder_file, tmp_path):
    torch.manual_seed(0)
    model = train_diffusion.build_model(_pooled_model_config(), autoencoder_file).eval()
    with torch.no_grad():  # SD zero-initialises the output convolutions: an untrained UNet would answer 0 to any y
        for weight in model.unet.parameters():
            if weight.ndim > 1 and not weight.any():
                weight.normal_(std=0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 90])
    context = model.encode_text(["a red circle", "a blue square in the top left"])
    unet = model.unet
    with torch.no_grad():
        by_hand = unet(x, t, context=context, y=context.sum(dim=1) / context.shape[1])
        assert torch.equal(model.model_fn(x, t, context), by_hand)
        # the vector reaches the output: another y gives another prediction
        assert not torch.allclose(unet(x, t, context=context, y=torch.zeros(2, 16)), by_hand, atol=1e-4)
    path = tmp_path / "pooled.safetensors"
    model.save(path)
    rebuilt = LatentDiffusion.from_checkpoint(path).eval()
    assert rebuilt.model.pooled_context == "mean"
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.model_fn(x, t, context), by_hand, rtol=0, atol=0)
        images = rebuilt.sample(["a red circle"], {"name": "ddim", "num_steps": 2}, guidance_scale=3.0, height=16,
                                width=16, generator=torch.Generator().manual_seed(0), progress=False)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pooled_context": "max"}, "pooled_context must be one of ('mean',)"),
        ({"unet": {"num_classes": None, "adm_in_channels": None}}, "build it with num_classes: sequential"),
        ({"unet": {"adm_in_channels": 8}}, "adm_in_channels is 8, the pooled context has context_dim=16"),
        ({"pooled_context": None}, "set the model's pooled_context: mean"),
    ],
)
def test_pooled_context_and_the_unet_must_agree(autoencoder_file, change, message):
    config = _pooled_model_config(**change.get("unet", {}))
    if "pooled_context" in change:
        config["pooled_context"] = change["pooled_context"]
    with pytest.raises(ValueError) as error:
        train_diffusion.build_model(config, autoencoder_file)
    assert message in str(error.value)


def test_pooled_context_models_are_not_exported_to_sd_or_diffusers(autoencoder_file):
    from ldm.interop import diffusers as diffusers_interop
    from ldm.interop.sd_config import ours_to_sd_config

    model = train_diffusion.build_model(_pooled_model_config(), autoencoder_file)
    with pytest.raises(ConfigError, match="pooled_context: SD's LatentDiffusion gives its UNet no pooled prompt"):
        ours_to_sd_config(model.config)
    with pytest.raises(ValueError, match="pooled_context: diffusers' text-to-image pipelines"):
        diffusers_interop._part_configs({**model.config, "scale_factor": model.scale_factor})
