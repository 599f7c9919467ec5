"""``train-diffusion --data`` with each source ``ldm.data.sources`` recognises: a captioned folder (held-out
validation, grids of the data's captions), WebDataset shards, a latent cache (and its refusal of another autoencoder),
and aspect-ratio buckets through the training loader."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from tests.helpers import TINY_DIFFUSION_CONFIG, make_tiny_autoencoder_file

CAPTIONS = ["a red kite", "a green boat", "a blue door", "a white cat", "a black dog", "a pink cup"]
QUIET = ["lightning.val_every=0", "lightning.image_every=0", "lightning.logger=csv", "data.batch_size=2"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """12 captioned images of mixed sizes (metadata.jsonl)."""
    root = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(12):
        w, h = (36, 12) if i % 3 == 0 else (12, 36) if i % 3 == 1 else (18, 18)
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
        lines.append(json.dumps({"file_name": f"img{i:02d}.png", "text": CAPTIONS[i % len(CAPTIONS)]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _train(tmp_path, autoencoder_file, data, *extra):
    from scripts import train_diffusion

    run = tmp_path / "run"
    train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, "--run-dir", str(run),
                          "--data", str(data), "--max-steps", "2", *QUIET, *extra])
    return run, yaml.safe_load((run / "config.yaml").read_text())


def test_folder_holds_out_validation_and_samples_its_own_captions(tmp_path, autoencoder_file, photos):
    run, config = _train(tmp_path, autoencoder_file, photos)
    data = config["data"]
    assert data["train"]["target"] == data["validation"]["target"] == "ldm.data.split.HeldOutSplit"
    assert data["validation"]["params"]["part"] == "validation"
    # the grids show the data's captions, in the data's order, not the config's shapes prompts
    assert config["trainer"]["params"]["sample_prompts"] == CAPTIONS
    assert (run / "model.safetensors").is_file()


def test_prompts_named_on_the_command_line_win(tmp_path, autoencoder_file, photos):
    _, config = _train(tmp_path, autoencoder_file, photos, "trainer.params.sample_prompts=[a kite]",
                       "--val-fraction", "0")
    assert config["trainer"]["params"]["sample_prompts"] == ["a kite"]
    assert config["data"]["validation"] is None and config["data"]["train"]["target"].endswith("CaptionedImageFolder")


def test_shards(tmp_path, autoencoder_file, photos):
    from ldm.cli import make_shards

    pattern = make_shards.main(["--data", str(photos), "--out", str(tmp_path / "shards"), "--shard-size", "5",
                                "--no-progress"])
    run, config = _train(tmp_path, autoencoder_file, pattern)
    assert config["data"]["train"]["target"] == "ldm.data.shards.ShardDataset"
    assert config["data"]["validation"] is None  # a stream has no held-out part
    assert set(config["trainer"]["params"]["sample_prompts"]) <= set(CAPTIONS)
    assert (run / "model.safetensors").is_file()


def test_latent_cache_trains_and_refuses_another_autoencoder(tmp_path, autoencoder_file, photos):
    from ldm.cli import cache_latents

    cache = tmp_path / "cache"
    cache_latents.main(["--autoencoder", autoencoder_file, "--data", str(photos), "--out", str(cache), "--size", "16",
                        "--no-progress", "--device", "cpu"])
    run, config = _train(tmp_path, autoencoder_file, cache)
    assert config["data"]["train"]["params"]["dataset"]["target"] == "ldm.data.latent_cache.LatentCacheDataset"
    assert (run / "model.safetensors").is_file()

    other = make_tiny_autoencoder_file(tmp_path / "other.safetensors", scale_factor=0.5)
    from scripts import train_diffusion

    with pytest.raises(ValueError, match=str(cache)):
        train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", other, "--run-dir",
                              str(tmp_path / "run2"), "--data", str(cache), "--max-steps", "1", *QUIET])
    assert not (tmp_path / "run2").exists()  # refused before a run folder was made


def test_bucketed_folder_trains_with_one_shape_a_batch(tmp_path, photos):
    from ldm.data.buckets import BucketBatchSampler
    from ldm.resume import ResumeState
    from ldm.training import build_dataloaders

    node = {"target": "ldm.data.image_folder.CaptionedImageFolder",
            "params": {"root": str(photos), "size": 16, "buckets": True, "bucket_step": 8}}
    loader, _ = build_dataloaders({"batch_size": 2, "train": node})
    assert isinstance(loader.batch_sampler, BucketBatchSampler)
    shapes = {tuple(batch["image"].shape[2:]) for batch in loader}
    assert len(shapes) > 1  # several buckets, each batch stacked from one
    state = ResumeState.for_loader(loader)
    assert state.sampler is loader.batch_sampler and state.batch_size == 2


def test_autoencoder_evaluation_of_shards_uses_the_training_stream(tmp_path, photos):
    from ldm.cli import make_shards
    from ldm.cli.compute_scale_factor import dataset_node

    pattern = make_shards.main(["--data", str(photos), "--out", str(tmp_path / "shards"), "--no-progress"])
    node, _ = dataset_node("unused.safetensors", "validation", None, pattern, 16)  # shards have no held-out part
    assert node["target"] == "ldm.data.shards.ShardDataset"
