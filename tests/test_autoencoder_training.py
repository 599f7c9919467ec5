"""Training the autoencoder: loss goes down, manual GAN optimization, NaN stop, checkpoints/resume, the scripts."""

import json
import os
import sys
import types

import pytest
import torch
import yaml

from autoencoder import AutoencoderKL, load_autoencoder
from autoencoder.lightning import AutoencoderKLTraining
from autoencoder.losses import LPIPSWithDiscriminator
from ldm.checkpoint import read_safetensors_metadata
from ldm.training import build_trainer

TINY = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
            num_res_blocks=1, attn_resolutions=[], dropout=0.0)


class Blobs(torch.utils.data.Dataset):
    """Tiny stand-in dataset: a bright square on black, ``{"image": [3, size, size] in [-1, 1], "caption"}``.

    ``nan_index`` puts a NaN into that item (to test the NaN guard).
    """

    def __init__(self, n=8, size=16, seed=0, nan_index=None):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            img = -torch.ones(3, size, size)
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            img[:, y:y + size // 2, x:x + size // 2] = torch.rand(3, 1, 1, generator=g) * 2 - 1
            if i == nan_index:
                img[0, 0, 0] = float("nan")
            self.items.append(img)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"image": self.items[i], "caption": "a square"}


@pytest.fixture
def blobs_module(monkeypatch):
    module = types.ModuleType("_ae_test_data")
    module.Blobs = Blobs
    monkeypatch.setitem(sys.modules, "_ae_test_data", module)
    return "_ae_test_data.Blobs"


def _training_module(lossparams=None, lr=1e-3, size=16):
    lossconfig = {"target": "autoencoder.losses.LPIPSWithDiscriminator",
                  "params": {"perceptual_weight": 0.0, "use_discriminator": False, **(lossparams or {})}}
    return AutoencoderKLTraining(dict(TINY, resolution=size), 4, lossconfig, learning_rate=lr,
                                 adam_betas=(0.9, 0.99))


def test_a_few_adam_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = AutoencoderKL(TINY, embed_dim=4)
    loss_fn = LPIPSWithDiscriminator(perceptual_weight=0.0, use_discriminator=False)
    x = torch.stack([Blobs(4)[i]["image"] for i in range(4)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_at(step):
        rec, post = model(x, generator=torch.Generator().manual_seed(0))
        return loss_fn(x, rec, post, 0, step)[0]

    first = loss_at(0)
    for step in range(8):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_at(8)
    assert last < 0.8 * first.detach()


def test_manual_optimization_steps_both_networks_and_counts_batches(tmp_path):
    torch.manual_seed(0)
    module = _training_module({"disc_start": 0, "disc_weight": 0.5, "disc_ndf": 8, "disc_num_layers": 2,
                               "perceptual_weight": 0.5, "perceptual_backbone": "random",
                               "perceptual_net": "squeeze", "use_discriminator": True}, size=24)
    disc_before = [p.detach().clone() for p in module.loss.discriminator.parameters()]
    ae_before = module.autoencoder.decoder.conv_out.weight.detach().clone()
    logvar_before = module.loss.logvar.detach().clone()
    loader = torch.utils.data.DataLoader(Blobs(4, size=24), batch_size=2)
    trainer = build_trainer(tmp_path / "run", max_steps=2, log_every=1, checkpoint_every=2,
                            enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert trainer.global_step == 2  # two batches, although two optimizers stepped each time
    assert not torch.equal(module.autoencoder.decoder.conv_out.weight, ae_before)
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.loss.discriminator.parameters()))
    assert module.loss.logvar.item() != logvar_before.item()  # learned log-variance
    assert trainer.callback_metrics["train/d_weight"] > 0

    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2
    assert not any(k.startswith("loss.perceptual_loss.") for k in ckpt["state_dict"])  # LPIPS left out

    # resume: perceptual weights are put back from the module, the step count goes on
    resumed = _training_module({"disc_start": 0, "disc_ndf": 8, "disc_num_layers": 2, "perceptual_weight": 0.5,
                                "perceptual_backbone": "random", "perceptual_net": "squeeze",
                                "use_discriminator": True}, size=24)
    trainer2 = build_trainer(tmp_path / "run", max_steps=3, log_every=1, checkpoint_every=10,
                             enable_progress_bar=False, enable_model_summary=False)
    trainer2.fit(resumed, loader, ckpt_path=str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert trainer2.global_step == 3


def test_nan_in_autoencoder_training_names_the_step(tmp_path):
    module = _training_module()
    loader = torch.utils.data.DataLoader(Blobs(6, nan_index=2), batch_size=2, shuffle=False)
    trainer = build_trainer(tmp_path / "run", max_steps=5, log_every=1, checkpoint_every=10,
                            enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match="autoencoder loss became NaN at step 1"):
        trainer.fit(module, loader)


def test_log_images_puts_inputs_over_reconstructions():
    module = _training_module()
    batch = {"image": torch.stack([Blobs(3)[i]["image"] for i in range(3)])}
    images = module.log_images(batch, max_images=2)
    inputs, recs = images["reconstruction"]
    assert inputs.shape == recs.shape == (2, 3, 16, 16)
    assert torch.equal(inputs, batch["image"][:2]) and recs.abs().max() <= 1


def _write_config(tmp_path, target):
    config = {
        "model": {
            "target": "autoencoder.lightning.AutoencoderKLTraining",
            "params": {"learning_rate": 1e-3, "adam_betas": [0.9, 0.99], "embed_dim": 4, "ddconfig": TINY,
                       "lossconfig": {"target": "autoencoder.losses.LPIPSWithDiscriminator",
                                      "params": {"perceptual_weight": 0.0, "use_discriminator": False}}},
        },
        "data": {"params": {"batch_size": 2, "train": {"target": target, "params": {"n": 6}},
                            "validation": {"target": target, "params": {"n": 4, "seed": 1}}}},
        "lightning": {"max_steps": 2, "log_every": 1, "image_every": 2, "checkpoint_every": 2, "val_every": 2,
                      "limit_val_batches": 1, "scale_factor_batches": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_script_writes_a_complete_run_and_resumes(tmp_path, blobs_module, monkeypatch, capsys):
    from scripts import compute_scale_factor, evaluate_autoencoder, train_autoencoder

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no LPIPS weights: evaluation reports it
    config = _write_config(tmp_path, blobs_module)
    run = tmp_path / "run"
    weights = train_autoencoder.main(["--config", str(config), "--run-dir", str(run)])
    assert weights == str(run / "autoencoder.safetensors")
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "step000002.ckpt").is_file()
    assert (run / "images" / "reconstruction_step000002.png").is_file()
    assert list((run / "logs").glob("version_*/metrics.csv"))
    meta = read_safetensors_metadata(weights)
    assert float(meta["scale_factor"]) > 0 and json.loads(meta["config"])["params"]["ddconfig"] == TINY
    out = capsys.readouterr().out
    assert "latent mean" in out and "scale_factor" in out

    model, scale = load_autoencoder(weights)
    assert scale == pytest.approx(float(meta["scale_factor"]))

    # the file's data config names the test's own dataset class: allowed on purpose, as a user would
    new_scale = compute_scale_factor.main(["--ckpt", weights, "--num-batches", "3", "--seed", "1",
                                           "--allow-target", blobs_module])
    assert load_autoencoder(weights)[1] == pytest.approx(new_scale)
    assert "latent std" in capsys.readouterr().out

    result = evaluate_autoencoder.main(["--ckpt", weights, "--num-images", "3", "--json", str(tmp_path / "m.json")])
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["num_images"] == 3 and saved["psnr"]["mean"] == pytest.approx(result["psnr"]["mean"])
    assert 0 < saved["psnr"]["mean"] < 100 and -1 <= saved["ssim"]["mean"] <= 1
    assert str(saved["lpips"]).startswith("unavailable")

    train_autoencoder.main(["--resume", str(run), "--max-steps", "3", "--allow-target", blobs_module])
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3


def test_train_script_stops_at_start_without_lpips_weights(tmp_path, blobs_module, monkeypatch):
    from scripts import train_autoencoder

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _write_config(tmp_path, blobs_module)
    with pytest.raises(SystemExit, match="vgg16-397923af.pth"):
        train_autoencoder.main(["--config", str(config), "--run-dir", str(tmp_path / "run"),
                                "model.params.lossconfig.params.perceptual_weight=1.0"])
    assert not os.path.exists(tmp_path / "run")  # stopped before any run folder was made


def test_ema_weights_follow_the_litema_update(tmp_path):
    import pytorch_lightning as pl

    torch.manual_seed(0)
    lossconfig = {"target": "autoencoder.losses.LPIPSWithDiscriminator",
                  "params": {"perceptual_weight": 0.0, "use_discriminator": False}}
    module = AutoencoderKLTraining(TINY, 4, lossconfig, learning_rate=1e-2, ema_decay=0.5)
    name = "decoder.conv_out.weight"
    history = [module.autoencoder.state_dict()[name].clone()]

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(pl_module.autoencoder.state_dict()[name].clone())

    trainer = build_trainer(tmp_path / "run", max_steps=3, log_every=1, checkpoint_every=10,
                            enable_progress_bar=False, enable_model_summary=False, extra_callbacks=[Spy()])
    trainer.fit(module, torch.utils.data.DataLoader(Blobs(6), batch_size=2))
    expected = history[0].double()
    for n, weight in enumerate(history[1:], start=1):
        decay = min(0.5, (1 + n) / (10 + n))
        expected = expected + (1 - decay) * (weight.double() - expected)
    torch.testing.assert_close(module.autoencoder_ema.state_dict()[name].double(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(module.autoencoder_ema.state_dict()[name], history[-1])
    assert module.inference_autoencoder() is module.autoencoder_ema
    assert int(module.ema_num_updates) == 3


def test_train_script_data_folder_option(tmp_path, blobs_module):
    from PIL import Image

    from scripts import train_autoencoder

    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")  # no captions: the autoencoder needs none
    config = _write_config(tmp_path, blobs_module)
    run = tmp_path / "run"
    train_autoencoder.main(["--config", str(config), "--data", str(folder), "--run-dir", str(run),
                            "--max-steps", "1"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    train_node, val_node = saved["data"]["params"]["train"], saved["data"]["params"]["validation"]
    # a flat folder: a held-out part validates (not the training images again)
    assert train_node["target"] == val_node["target"] == "ldm.data.split.HeldOutSplit"
    assert (train_node["params"]["part"], val_node["params"]["part"]) == ("train", "validation")
    inner = train_node["params"]["dataset"]
    assert inner["target"] == "ldm.data.image_folder.CaptionedImageFolder"
    assert inner["params"] == {"root": str(folder), "size": 16, "crop": "random", "flip": True,
                               "caption_source": "none"}
    assert val_node["params"]["dataset"]["params"]["crop"] == "center"
    from ldm.util import instantiate_from_config

    train_set, val_set = instantiate_from_config(train_node), instantiate_from_config(val_node)
    assert (len(train_set), len(val_set)) == (3, 1) and not set(train_set.indices) & set(val_set.indices)
    assert (run / "autoencoder.safetensors").is_file()

    # a folder with its own train/ and validation/ folders: that split, nothing held out
    split = tmp_path / "split"
    for part, count in (("train", 3), ("validation", 2)):
        (split / part).mkdir(parents=True)
        for i in range(count):
            Image.open(folder / f"img{i}.png").save(split / part / f"img{i}.png")
    run2 = tmp_path / "run2"
    train_autoencoder.main(["--config", str(config), "--data", str(split), "--run-dir", str(run2), "--max-steps", "1"])
    saved = yaml.safe_load((run2 / "config.yaml").read_text())["data"]["params"]
    assert saved["train"]["params"]["root"] == str(split / "train")
    assert saved["validation"]["params"]["root"] == str(split / "validation")
