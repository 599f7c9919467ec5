"""Latent cache (ldm/data/latent_cache.py, ldm cache-latents) and training from it (DiffusionTrainer.batch_loss).

The reference values are computed here without the cache's code: the posterior straight from the autoencoder's
encoder and quant_conv, mirrored images from numpy, the dropout rows by replaying the caption RNG."""

import json
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import default_collate

from autoencoder.io import load_autoencoder
from ldm.data.image_folder import CaptionedImageFolder
from ldm.data.latent_cache import (
    LatentCacheDataset,
    autoencoder_fingerprint,
    write_latent_cache,
)
from ldm.data.sources import CACHE_MANIFEST, CACHE_TARGET, data_kind, dataset_node
from ldm.models.diffusion_trainer import DiffusionTrainer, posterior_latents
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.util import instantiate_from_config

SIZE = 16  # the tiny autoencoder's resolution; f2 -> latents [4, 8, 8]
NUM_IMAGES = 5


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Five noise images with captions (one wider than tall, so the center crop matters)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    lines = []
    for index in range(NUM_IMAGES):
        width = 24 if index == 2 else SIZE
        Image.fromarray(rng.randint(0, 256, (SIZE, width, 3), dtype=np.uint8)).save(root / f"{index}.png")
        lines.append(json.dumps({"file_name": f"{index}.png", "text": f"picture number {index}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def images(image_folder):
    """``(images [N,3,16,16], captions)`` in the folder's order, loaded as training would load them."""
    folder = CaptionedImageFolder(image_folder, size=SIZE, crop="center")
    items = [folder[i] for i in range(len(folder))]
    return torch.stack([item["image"] for item in items]), [item["caption"] for item in items]


@pytest.fixture(scope="module")
def autoencoder(autoencoder_file):
    model, scale = load_autoencoder(autoencoder_file)
    assert scale == 0.7
    return model


@pytest.fixture(scope="module")
def text_encoder(trained):
    return LatentDiffusion.from_checkpoint(trained[0]).cond_stage_model


def loader(images, captions, batch_size=2):
    return [{"image": images[i:i + batch_size], "caption": captions[i:i + batch_size]}
            for i in range(0, len(captions), batch_size)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, autoencoder, autoencoder_file, images, text_encoder, image_folder):
    """Both flips and contexts, batches of 2 in chunks of >= 3 (so two chunk files: 4 + 1 samples)."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    write_latent_cache(out, autoencoder, 0.7, loader(*images), image_size=SIZE, flips="both",
                       text_encoder=text_encoder, source=str(image_folder), autoencoder_path=autoencoder_file,
                       chunk_size=3)
    return out


def reference_posterior(autoencoder, images):
    """mean, std of q(z|x) from the encoder and quant_conv: moments = [mean, logvar], std = exp(logvar / 2)."""
    with torch.no_grad():
        moments = autoencoder.quant_conv(autoencoder.encoder(images))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def mirrored(images):
    """Horizontal mirror through numpy (independent of torch.flip)."""
    return torch.from_numpy(np.ascontiguousarray(images.numpy()[..., ::-1]))


def trainer_for(weights, **kwargs):
    model = LatentDiffusion.from_checkpoint(weights)
    options = dict(ema_decay=None, sample_height=SIZE, sample_width=SIZE, warmup_steps=1)
    options.update(kwargs)
    return DiffusionTrainer(model, **options)


def mixed_dropout_seed(p=0.5):
    """A caption-RNG seed whose first NUM_IMAGES draws drop some captions and keep others, and those rows."""
    for seed in range(100):
        replay = random.Random(seed)
        dropped = [replay.random() < p for _ in range(NUM_IMAGES)]
        if any(dropped) and not all(dropped):
            return seed, dropped
    raise AssertionError("no seed mixes dropped and kept captions")


def cached_batch(root, flip=False):
    dataset = LatentCacheDataset(root, flip=flip)
    return default_collate([dataset[i] for i in range(len(dataset))])


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_follows_every_key_dtype_and_value(autoencoder):
    state = {key: value.clone() for key, value in autoencoder.state_dict().items()}
    fingerprint = autoencoder_fingerprint(autoencoder)
    assert fingerprint == autoencoder_fingerprint(state)
    assert fingerprint == autoencoder_fingerprint(dict(reversed(list(state.items()))))  # order of keys is not hashed
    changed = dict(state)
    changed["quant_conv.bias"] = state["quant_conv.bias"].clone()
    changed["quant_conv.bias"][0] += 1e-6
    assert autoencoder_fingerprint(changed) != fingerprint
    cast = {key: value.double() for key, value in state.items()}
    assert autoencoder_fingerprint(cast) != fingerprint
    renamed = dict(state)
    renamed["renamed.bias"] = renamed.pop("quant_conv.bias")
    assert autoencoder_fingerprint(renamed) != fingerprint


# ---------------------------------------------------------------- what is cached
def test_cached_mean_and_std_are_the_posterior_of_each_image(cache, autoencoder, images):
    pixels, captions = images
    dataset = LatentCacheDataset(cache, flip=False)
    assert len(dataset) == NUM_IMAGES and len(dataset.files) == 2  # 4 + 1 samples: items cross a chunk boundary
    mean, std = reference_posterior(autoencoder, pixels)
    for index in range(NUM_IMAGES):
        item = dataset[index]
        assert item["caption"] == captions[index]
        assert item["latent_mean"].shape == (4, 8, 8) and item["latent_mean"].dtype == torch.float32
        torch.testing.assert_close(item["latent_mean"], mean[index], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(item["latent_std"], std[index], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mean[0], mean[1])  # the images differ, so a mix-up would show


def test_both_flips_are_the_posteriors_of_the_mirrored_images(cache, autoencoder, images):
    pixels, _ = images
    plain_mean, _ = reference_posterior(autoencoder, pixels)
    flip_mean, flip_std = reference_posterior(autoencoder, mirrored(pixels))
    assert not torch.allclose(plain_mean, flip_mean, atol=1e-3)
    dataset = LatentCacheDataset(cache)  # default: the cache has flips, so a random one per item
    assert dataset.flip
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        item = dataset[3]
        if torch.allclose(item["latent_mean"], flip_mean[3], rtol=1e-5, atol=1e-6):
            torch.testing.assert_close(item["latent_std"], flip_std[3], rtol=1e-5, atol=1e-6)
            seen.add("flipped")
        else:
            torch.testing.assert_close(item["latent_mean"], plain_mean[3], rtol=1e-5, atol=1e-6)
            seen.add("plain")
    assert seen == {"plain", "flipped"}
    unflipped = LatentCacheDataset(cache, flip=False)
    for seed in range(6):
        torch.manual_seed(seed)
        torch.testing.assert_close(unflipped[3]["latent_mean"], plain_mean[3], rtol=1e-5, atol=1e-6)


def test_contexts_are_the_text_encoders(cache, text_encoder, images):
    _, captions = images
    dataset = LatentCacheDataset(cache, flip=False)
    expected = text_encoder.encode(captions)
    for index in range(NUM_IMAGES):
        torch.testing.assert_close(dataset[index]["context"], expected[index], rtol=1e-5, atol=1e-6)


def test_dataset_survives_pickling_for_workers(cache):
    dataset = LatentCacheDataset(cache, flip=False)
    first = dataset[4]  # opens a chunk handle, which must not be pickled
    copy = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(copy[4]["latent_mean"], first["latent_mean"], rtol=0, atol=0)


# ---------------------------------------------------------------- training from the cache
def test_training_loss_of_a_cached_batch_equals_the_image_batchs(cache, images, trained):
    pixels, captions = images
    trainer = trainer_for(trained[0], p_uncond=0.5)
    latent_batch = cached_batch(cache)

    caption_seed, _ = mixed_dropout_seed()  # dropped rows: encode_text("") against the empty-prompt context

    def loss(batch, training, seed=7, generator=None):
        trainer._caption_rng = random.Random(caption_seed)
        torch.manual_seed(seed)
        return trainer.batch_loss(batch, training=training, generator=generator)[0]

    from_images = loss({"image": pixels, "caption": captions}, training=True)
    trainer.model.first_stage_model.encode = None  # the cached path must not run the autoencoder
    try:
        from_cache = loss(latent_batch, training=True)
        other_draw = loss(latent_batch, training=True, seed=8)
    finally:
        del trainer.model.first_stage_model.encode
    torch.testing.assert_close(from_cache, from_images, rtol=1e-5, atol=1e-7)
    assert abs(float(other_draw.detach()) - float(from_images.detach())) > 1e-4  # the comparison can fail: draws matter
    # validation: posterior means, every caption, the generator's t and noise
    val_images = loss({"image": pixels, "caption": captions}, False, generator=torch.Generator().manual_seed(0))
    val_cache = loss(latent_batch, False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(val_cache, val_images, rtol=1e-5, atol=1e-7)


def test_posterior_latents_sample_and_mode():
    mean, std = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3)
    torch.manual_seed(11)
    eps = torch.randn(2, 4, 3, 3)
    torch.manual_seed(11)
    torch.testing.assert_close(posterior_latents(mean, std, 0.7, sample=True), 0.7 * (mean + std * eps))
    torch.testing.assert_close(posterior_latents(mean, std, 0.7, sample=False), 0.7 * mean)


def capture_cond(monkeypatch):
    seen = {}

    def fake_loss(model_fn, schedule, latents, cond=None, **kwargs):
        seen["cond"] = cond
        return latents.sum() * 0

    monkeypatch.setattr("ldm.models.diffusion_trainer.diffusion_loss", fake_loss)
    return seen


def test_caption_dropout_gives_dropped_rows_the_empty_prompt_context(cache, trained, monkeypatch):
    trainer = trainer_for(trained[0], p_uncond=0.5)
    batch = cached_batch(cache)
    caption_seed, dropped = mixed_dropout_seed()  # both kinds of rows are checked
    seen = capture_cond(monkeypatch)
    trainer._caption_rng = random.Random(caption_seed)
    trainer.batch_loss(batch, training=True)
    empty = trainer.model.encode_text([""])[0]
    for row, was_dropped in enumerate(dropped):
        expected = empty if was_dropped else batch["context"][row]
        torch.testing.assert_close(seen["cond"][row], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(empty, batch["context"][0], atol=1e-3)
    trainer.batch_loss(batch, training=False)  # validation keeps every caption
    torch.testing.assert_close(seen["cond"], batch["context"], rtol=0, atol=0)


def test_a_trained_text_encoder_ignores_cached_contexts(cache, trained, monkeypatch):
    model = LatentDiffusion.from_checkpoint(trained[0])
    model.cond_stage_model.requires_grad_(True)
    trainer = DiffusionTrainer(model, p_uncond=0.0, ema_decay=None, sample_height=SIZE, sample_width=SIZE,
                               cond_stage_trainable=True)
    batch = cached_batch(cache)
    batch["context"] = torch.zeros_like(batch["context"])  # stale contexts must not be used
    seen = capture_cond(monkeypatch)
    trainer.batch_loss(batch, training=True)
    with torch.no_grad():
        torch.testing.assert_close(seen["cond"], model.encode_text(batch["caption"]), rtol=1e-5, atol=1e-6)


def test_inpainting_model_refuses_a_latent_batch(cache, trained):
    trainer = trainer_for(trained[0])
    trainer.inpainting = True
    with pytest.raises(ValueError, match="inpainting.*pixels"):
        trainer.batch_loss(cached_batch(cache), training=True)


def test_unpack_names_the_missing_latent_key(trained):
    trainer = trainer_for(trained[0])
    with pytest.raises(KeyError, match="latent_std"):
        trainer.batch_loss({"latent_mean": torch.zeros(1, 4, 8, 8), "caption": ["x"]}, training=True)


# ---------------------------------------------------------------- compatibility
def test_check_compatible_refuses_another_autoencoder_scale_or_text_encoder(cache, trained):
    dataset = LatentCacheDataset(cache)
    root = str(cache.resolve())
    dataset.check_compatible(LatentDiffusion.from_checkpoint(trained[0]))  # the same parts: accepted

    other_ae = LatentDiffusion.from_checkpoint(trained[0])
    with torch.no_grad():
        other_ae.first_stage_model.quant_conv.bias[0] += 0.01
    with pytest.raises(ValueError, match="autoencoder fingerprint") as error:
        dataset.check_compatible(other_ae)
    assert root in str(error.value)

    other_scale = LatentDiffusion.from_checkpoint(trained[0])
    other_scale.scale_factor = 0.5
    with pytest.raises(ValueError, match="scale factor 0.5 differs from the cache's 0.7") as error:
        dataset.check_compatible(other_scale)
    assert root in str(error.value)

    other_text = LatentDiffusion.from_checkpoint(trained[0])
    with torch.no_grad():
        next(other_text.cond_stage_model.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="text encoder fingerprint"):
        dataset.check_compatible(other_text)
    dataset.check_compatible(other_text, text_encoder=False)  # a trained text encoder ignores the contexts

    other_layer = LatentDiffusion.from_checkpoint(trained[0])
    other_layer.cond_stage_model.layer_idx = 0  # same weights, the last layer instead of the penultimate
    with pytest.raises(ValueError, match="encodes the empty prompt differently"):
        dataset.check_compatible(other_layer)

    inpainting = LatentDiffusion.from_checkpoint(trained[0])
    inpainting.config = {**inpainting.config, "inpainting": True}
    with pytest.raises(ValueError, match="inpainting"):
        dataset.check_compatible(inpainting)


def test_flip_refused_for_a_cache_without_flips(tmp_path, autoencoder, images):
    out = tmp_path / "noflip"
    write_latent_cache(out, autoencoder, 0.7, loader(*images), image_size=SIZE)
    with pytest.raises(ValueError, match="--flip"):
        LatentCacheDataset(out, flip=True)
    assert not LatentCacheDataset(out).flip and "context" not in LatentCacheDataset(out)[0]


# ---------------------------------------------------------------- storage and damage
def test_bfloat16_storage_round_trips_within_its_precision(tmp_path, cache, autoencoder, images):
    out = tmp_path / "bf16"
    manifest = write_latent_cache(out, autoencoder, 0.7, loader(*images), image_size=SIZE, flips="both",
                                  dtype="bfloat16")
    assert manifest["dtype"] == "bfloat16"
    with safe_open(str(out / manifest["chunks"][0]["file"]), framework="pt") as handle:
        assert handle.get_slice("mean").get_dtype() == "BF16"
    full, half = LatentCacheDataset(cache, flip=False), LatentCacheDataset(out, flip=False)
    exact = True
    for index in range(NUM_IMAGES):
        for key in ("latent_mean", "latent_std"):
            reference, stored = full[index][key], half[index][key]
            assert stored.dtype == torch.float32
            # bf16 keeps 8 significant bits: rounding to nearest errs by at most 2^-8 relative
            assert ((stored - reference).abs() <= 2.0 ** -8 * reference.abs()).all()
            exact &= torch.equal(stored, reference)
    assert not exact  # the values really went through bf16


def test_a_missing_or_damaged_chunk_is_named(tmp_path, cache):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    (broken / "chunk-000001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="chunk-000001.safetensors"):
        LatentCacheDataset(broken)

    torch.save({"mean": torch.zeros(1)}, broken / "chunk-000001.safetensors")  # a pickle is never loaded
    with pytest.raises(ValueError, match="chunk-000001.safetensors.*not a readable safetensors"):
        LatentCacheDataset(broken)

    manifest = json.loads((broken / CACHE_MANIFEST).read_text())
    manifest["chunks"][0]["file"] = "../elsewhere.safetensors"
    (broken / CACHE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="latent_cache.json.*not a plain file name"):
        LatentCacheDataset(broken)

    (broken / CACHE_MANIFEST).write_text('{"format": "ldm-latent-cache", ')
    with pytest.raises(ValueError, match="latent_cache.json: not valid JSON"):
        LatentCacheDataset(broken)


def test_an_interrupted_write_leaves_no_cache(tmp_path, autoencoder, images):
    out = tmp_path / "interrupted"

    def batches():
        yield from loader(*images)[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_latent_cache(out, autoencoder, 0.7, batches(), image_size=SIZE, chunk_size=2)
    assert (out / "chunk-000000.safetensors").is_file()  # chunks were written, the manifest was not
    assert not (out / CACHE_MANIFEST).exists() and data_kind(out) == "folder"
    with pytest.raises(FileNotFoundError, match="latent_cache.json not found"):
        LatentCacheDataset(out)
    write_latent_cache(out, autoencoder, 0.7, loader(*images), image_size=SIZE)  # a rerun completes it
    assert len(LatentCacheDataset(out)) == NUM_IMAGES


# ---------------------------------------------------------------- the command
def test_cache_latents_command_end_to_end(tmp_path, image_folder, autoencoder_file, trained, cache, capsys):
    from ldm.cli import main as ldm_main
    from scripts import cache_latents as script

    out = tmp_path / "cli-cache"
    argv = ["cache-latents", "--autoencoder", autoencoder_file, "--data", str(image_folder), "--out", str(out),
            "--size", str(SIZE), "--text-encoder-from", trained[0], "--batch-size", "3", "--device", "cpu",
            "--no-progress"]
    ldm_main(argv)
    manifest = json.loads((out / CACHE_MANIFEST).read_text())
    assert (manifest["image_size"], manifest["crop"], manifest["flips"], manifest["scale_factor"]) == (
        SIZE, "center", "none", 0.7)
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["num_samples"] == NUM_IMAGES
    assert manifest["text_encoder"]["context_shape"] == [16, 16]

    node = dataset_node(out, SIZE)  # what --data CACHE_DIR becomes
    assert node == {"target": CACHE_TARGET, "params": {"root": str(out)}}
    dataset = instantiate_from_config(node)
    dataset.check_compatible(LatentDiffusion.from_checkpoint(trained[0]))
    reference = LatentCacheDataset(cache, flip=False)  # written by the API from the same images
    for index in range(NUM_IMAGES):
        for key in ("latent_mean", "latent_std", "context"):
            torch.testing.assert_close(dataset[index][key], reference[index][key], rtol=1e-5, atol=1e-6)

    with pytest.raises(SystemExit) as stop:  # an existing cache is never overwritten
        ldm_main(argv)
    assert stop.value.code == 2
    assert f"--out {out} already holds a latent cache" in capsys.readouterr().err
    assert script.main is __import__("ldm.cli.cache_latents", fromlist=["main"]).main
