#!/usr/bin/env python
"""Training beyond one process, measured on this CPU: data sources, the latent cache's saving, 1 vs 2 processes.

    python benchmarks/scale.py [--quick] [--json OUT] [--md OUT] [--threads N] [--only data,train,processes]

1. **Data throughput** (samples/s) of the three ``--data`` sources feeding the diffusion trainer, at ``size`` px:
   a captioned image folder of generated photo-like JPEGs and PNGs (mixed sizes, larger than ``size``), the same
   folder written as WebDataset shards (``ldm make-shards``), and a latent cache of it (``ldm cache-latents``, a
   randomly initialised kl-f8 autoencoder). Each is iterated through a real ``DataLoader``
   (``ldm.training.build_dataloader`` on the node ``ldm.data.sources.dataset_node`` makes, ``num_workers`` 0),
   and each batch gets what training needs before the UNet: folder and shards decode, resize, random-crop and
   kl-f8-encode (a posterior sample, ``LatentDiffusion.encode_images``); the cache loads the posterior's moments
   and draws the sample (``posterior_latents``). The three are called in turn, a batch each, and the medians are
   reported; "load only" (no encode) is measured the same way.
2. **Training step** on cached latents vs on-the-fly encoding: ``DiffusionTrainer.batch_loss`` + backward + AdamW
   step of a ``LatentDiffusion`` (``ldm.cli.train_diffusion.build_model``: kl-f8 + an SD-v1-shaped UNet narrowed to
   ``unet_channels``, the demo's tiny open_clip text tower) on an image batch and on the cached-latent batch of the
   same images, alternating after warm-up; medians and the speed-up (the issue's target: >= 1.3x).
3. **1 vs 2 processes**: ``python -m ldm train-diffusion`` on the tiny test config (``tests/configs/tiny-diffusion.yaml``,
   ``tests.helpers.make_tiny_autoencoder_file``), ``--devices 1|2 lightning.accelerator=cpu``, ``LDM_THREADS=1``
   each, at the same global batch (1 process x 2B, 2 processes x B; with ``--threads`` >= 2 also 1 process x 2B on
   2 threads, the same cores as two processes). The step time is parsed from the run's TensorBoard events (the wall time at which each
   step's loss was logged; median of step-to-step differences after warm-up), so start-up, DDP set-up and export
   do not count. On 2 shared cores this shows correctness and overhead, not scaling.

``--quick`` makes everything tiny (a kl-f8-shaped autoencoder at a quarter of its width, 64 px, a few images, a few
repeats): a smoke run for the tests. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure of it

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import harness  # noqa: E402

log = logging.getLogger("benchmarks.scale")

KL_F8_CONFIG = os.path.join(REPO, "configs", "autoencoder", "kl-f8.yaml")
TINY_DIFFUSION_CONFIG = os.path.join(REPO, "tests", "configs", "tiny-diffusion.yaml")
SCALE_FACTOR = 0.18215  # SD v1's; a random autoencoder has no meaningful one, and the value does not change timings
TARGET_SPEEDUP = 1.3  # the target for training on cached latents
PARTS = ("data", "train", "processes")
# The demo's tiny open_clip text tower (configs/demo/diffusion.yaml), random and frozen as SD v1's CLIP is: no download.
TEXT_ENCODER = {
    "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
    "params": {"arch": "tiny-text", "version": None, "layer": "last", "max_length": 77, "freeze": True,
               "model_config": {"embed_dim": 64,
                                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4,
                                             "layers": 2}}},
}
CAVEAT = ("2 processes share the machine's 2 cores with each other (and with whatever else runs): this shows that "
          "several processes train correctly and what DDP costs per step, not how training scales on real hardware")


@dataclass
class Settings:
    size: int  # image side in pixels (latents are size / 8)
    num_images: int  # images in the generated folder
    batch_size: int  # data throughput batch
    train_batch: int  # training-step batch
    autoencoder_channels: int  # kl-f8's ch (128 is SD's)
    unet_channels: int  # model_channels of the SD-v1-shaped UNet (320 is SD's)
    shard_size: int  # samples per shard
    warmup: int
    min_repeats: int
    max_repeats: int
    budget_s: float  # timed rounds of each part last about this long
    process_steps: int  # optimizer steps of each train-diffusion subprocess
    process_batch: int  # B: 1 process runs 2B, 2 processes B each
    same_cores_run: bool  # also 1 process x 2B with 2 threads


FULL = Settings(size=256, num_images=32, batch_size=4, train_batch=2, autoencoder_channels=128, unet_channels=64,
                shard_size=16, warmup=1, min_repeats=3, max_repeats=10, budget_s=60.0, process_steps=60,
                process_batch=2, same_cores_run=True)
QUICK = Settings(size=64, num_images=6, batch_size=2, train_batch=2, autoencoder_channels=32, unet_channels=32,
                 shard_size=4, warmup=1, min_repeats=2, max_repeats=3, budget_s=2.0, process_steps=8,
                 process_batch=2, same_cores_run=False)


# ---------------------------------------------------------------------------------------------------- images


def photo_like(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    """``uint8 [H,W,3]``: smooth colour fields (a bicubic upsampling of a coarse random grid), a few hard-edged
    blobs and sensor-like noise, so JPEG and PNG sizes and decode times resemble photos more than flat shapes do."""
    from PIL import Image, ImageDraw

    coarse = rng.randint(0, 256, (rng.randint(3, 8), rng.randint(3, 8), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):
        x0, y0 = rng.randint(0, width - 8), rng.randint(0, height - 8)
        x1, y1 = x0 + rng.randint(8, width // 2), y0 + rng.randint(8, height // 2)
        fill = tuple(int(v) for v in rng.randint(0, 256, 3))
        (draw.ellipse if rng.rand() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 6.0, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` captioned images in ``root`` (``metadata.jsonl``), alternately JPEG (quality 90) and PNG, each side
    drawn from ``[1.15, 1.6] x size`` (300-400 px around 256): every image is resized and cropped, as real data is."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    lines = []
    for index in range(count):
        height, width = (int(size * rng.uniform(1.15, 1.6)) for _ in range(2))
        name = f"{index:04d}.{'jpg' if index % 2 == 0 else 'png'}"
        pixels = Image.fromarray(photo_like(rng, height, width))
        pixels.save(root / name, **({"quality": 90} if name.endswith(".jpg") else {}))
        lines.append(json.dumps({"file_name": name, "text": f"photo {index}: shapes over a colour field"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# ---------------------------------------------------------------------------------------------------- model


def kl_f8_ddconfig(channels: int, size: int) -> dict:
    """configs/autoencoder/kl-f8.yaml's encoder/decoder config, with ``ch`` set to ``channels`` (128 is SD's)."""
    from ldm.util import load_config, to_container

    ddconfig = dict(to_container(load_config(KL_F8_CONFIG))["model"]["params"]["ddconfig"])
    ddconfig.update(ch=int(channels), resolution=int(size))
    return ddconfig


def make_autoencoder_file(path: Path, channels: int, size: int) -> str:
    """A randomly initialised kl-f8 ``AutoencoderKL`` written as stage one writes it (``save_autoencoder`` with a
    scale factor), as ``tests.helpers.make_tiny_autoencoder_file`` does for the tiny one."""
    from autoencoder import AutoencoderKL, save_autoencoder

    torch.manual_seed(0)
    model = AutoencoderKL(ddconfig=kl_f8_ddconfig(channels, size), embed_dim=4)
    save_autoencoder(path, model, scale_factor=SCALE_FACTOR)
    return str(path)


def model_config(settings: Settings) -> dict:
    """The diffusion model around the autoencoder: SD v1's UNet (v1-inference.yaml: attention at 4, 2, 1, two res
    blocks a level, channel_mult 1 2 4 4, 8 heads) at ``unet_channels`` instead of 320, on :data:`TEXT_ENCODER`
    (its width is the UNet's context_dim), SD's scaled_linear schedule and eps-prediction."""
    context_dim = int(TEXT_ENCODER["params"]["model_config"]["text_cfg"]["width"])
    unet = dict(image_size=settings.size // 8, in_channels=4, out_channels=4, model_channels=settings.unet_channels,
                attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
                use_spatial_transformer=True, transformer_depth=1, context_dim=context_dim, use_checkpoint=False,
                legacy=False)
    return {
        "image_size": settings.size,
        "parameterization": "eps",
        "text_encoder": TEXT_ENCODER,
        "unet": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "schedule": {"target": "ldm.diffusion.NoiseSchedule",
                     "params": {"kind": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085,
                                "beta_end": 0.012}},
    }


def build_model(settings: Settings, autoencoder_path: str):
    """The ``LatentDiffusion`` train-diffusion builds from ``--autoencoder`` (its ``build_model``)."""
    from ldm.cli.train_diffusion import build_model as build

    torch.manual_seed(0)
    return build(model_config(settings), autoencoder_path)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------- sources


@dataclass
class Workspace:
    """What the measurements read: the three data sources, the autoencoder file and the model."""

    root: Path
    folder: str
    shards: str  # the folder of .tar shards (what --data takes)
    cache: str
    autoencoder: str
    model: Any
    shards_build_s: float
    cache_build_s: float


def prepare_workspace(root: Path, settings: Settings, threads: int) -> Workspace:
    """Generate the images, write them as shards and as a latent cache with the CLI commands, build the model."""
    from ldm.cli import cache_latents, make_shards

    folder = make_image_folder(root / "images", settings.num_images, settings.size)
    autoencoder = make_autoencoder_file(root / "autoencoder.safetensors", settings.autoencoder_channels,
                                        settings.size)
    log.info("writing %d images as shards ...", settings.num_images)
    start = time.perf_counter()
    make_shards.main(["--data", str(folder), "--out", str(root / "shards"), "--shard-size", str(settings.shard_size),
                      "--no-progress", "--threads", str(threads)])
    shards_build_s = time.perf_counter() - start
    log.info("caching the latents of %d images (kl-f8 encode) ...", settings.num_images)
    start = time.perf_counter()
    cache_latents.main(["--autoencoder", autoencoder, "--data", str(folder), "--out", str(root / "cache"),
                        "--size", str(settings.size), "--batch-size", str(settings.batch_size), "--no-progress",
                        "--threads", str(threads), "--device", "cpu"])
    cache_build_s = time.perf_counter() - start
    model = build_model(settings, autoencoder)
    return Workspace(root, str(folder), str(root / "shards"), str(root / "cache"), autoencoder, model,
                     shards_build_s, cache_build_s)


def source_loader(path: str, settings: Settings, crop: str = "random"):
    """The training ``DataLoader`` of ``--data path``: ``dataset_node`` -> ``build_dataloader`` (shuffled, whole
    batches, no worker processes: the main process's cost per sample is what is measured)."""
    from ldm.data.sources import dataset_node
    from ldm.training import build_dataloader

    node = dataset_node(path, settings.size, crop=crop)
    return build_dataloader(node, settings.batch_size, shuffle=True, num_workers=0, drop_last=True, seed=0)


def cycling(loader) -> Callable[[], Any]:
    """A zero-argument function returning the loader's next batch, starting a new epoch when one ends."""
    state: dict[str, Optional[Iterator]] = {"it": None}

    def next_batch():
        for _ in range(2):  # a fresh iterator at most once per call
            if state["it"] is None:
                state["it"] = iter(loader)
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = None
        raise RuntimeError("the loader yields no batch")

    return next_batch


def to_latents(model, batch) -> torch.Tensor:
    """What ``DiffusionTrainer.batch_loss`` turns a batch into before the UNet: the scaled posterior sample, encoded
    now from images or drawn from cached moments."""
    from ldm.data.latent_cache import LATENT_MEAN, LATENT_STD
    from ldm.models.diffusion_trainer import posterior_latents

    with torch.no_grad():
        if "image" in batch:
            return model.encode_images(batch["image"], sample=True)
        return posterior_latents(batch[LATENT_MEAN], batch[LATENT_STD], model.scale_factor, sample=True)


def with_latents_of(model, next_batch: Callable[[], Any]) -> Callable[[], torch.Tensor]:
    """One call: the next batch and its latents (the unit the data throughput is timed in)."""
    return lambda: to_latents(model, next_batch())


def measure_data(ws: Workspace, settings: Settings) -> dict:
    """Samples/s of each source, with the latents (``to_latents``) and loading only, the sources called in turn."""
    paths = {"folder": ws.folder, "shards": ws.shards, "cache": ws.cache}
    with_latents = {name: with_latents_of(ws.model, cycling(source_loader(path, settings)))
                    for name, path in paths.items()}
    log.info("data throughput with the latents (folder, shards, cache in turn) ...")
    latent_times = harness.alternate(with_latents, settings.warmup, settings.min_repeats, settings.max_repeats,
                                     settings.budget_s)
    loads = {name: cycling(source_loader(path, settings)) for name, path in paths.items()}
    log.info("data throughput, loading only ...")
    # loading alone is cheap: more repeats for the same budget share
    load_times = harness.alternate(loads, settings.warmup, settings.min_repeats, 4 * settings.max_repeats,
                                   settings.budget_s / 4)
    sources = {}
    for name in paths:
        batch_s = harness.median_or_none(latent_times[name])
        load_s = harness.median_or_none(load_times[name])
        sources[name] = {
            "samples_per_s": settings.batch_size / batch_s, "batch_s": batch_s, "repeats": len(latent_times[name]),
            "load_only_samples_per_s": settings.batch_size / load_s, "load_only_batch_s": load_s,
            "load_only_repeats": len(load_times[name]),
        }
    return {
        "image_size": settings.size, "num_images": settings.num_images, "batch_size": settings.batch_size,
        "latent_shape": list(ws.model.latent_shape(settings.size, settings.size)),
        "autoencoder_params": parameter_count(ws.model.first_stage_model),
        "sources": sources,
        "cache_over_folder": sources["cache"]["samples_per_s"] / sources["folder"]["samples_per_s"],
        "shards_over_folder": sources["shards"]["samples_per_s"] / sources["folder"]["samples_per_s"],
        "shards_build_s": ws.shards_build_s, "cache_build_s": ws.cache_build_s,
        "cache_build_samples_per_s": settings.num_images / ws.cache_build_s,
    }


# ---------------------------------------------------------------------------------------------------- train step


def paired_batches(ws: Workspace, count: int) -> tuple[dict, dict]:
    """``(image batch, cached-latent batch)`` of the first ``count`` images: the folder center-cropped, as the cache
    was made (``cache-latents`` default), and the cache's first ``count`` items, in the same sorted order."""
    from torch.utils.data import default_collate

    from ldm.data.sources import dataset_node
    from ldm.util import instantiate_from_config

    size = ws.model.config["image_size"]
    folder = instantiate_from_config(dataset_node(ws.folder, size, crop="center"))
    cache = instantiate_from_config(dataset_node(ws.cache, size))
    cache.check_compatible(ws.model)  # the cache really is this model's autoencoder and scale factor
    images = default_collate([folder[i] for i in range(count)])
    cached = default_collate([cache[i] for i in range(count)])
    if list(images["caption"]) != list(cached["caption"]):
        raise RuntimeError("the cache's items are not the folder's images in the same order")
    return images, cached


def make_trainer(model):
    """The ``DiffusionTrainer`` train-diffusion would build (no EMA: the brief times loss, backward and AdamW) and
    its optimizer from its own ``configure_optimizers``."""
    from ldm.models.diffusion_trainer import DiffusionTrainer

    size = model.config["image_size"]
    module = DiffusionTrainer(model, learning_rate=1e-4, warmup_steps=1, ema_decay=None, sample_height=size,
                              sample_width=size)
    module.train()
    optimizer = module.configure_optimizers()["optimizer"]
    return module, optimizer


def train_step(module, optimizer, batch) -> float:
    """One optimizer step: ``batch_loss`` (encoders included where the batch needs them) + backward + AdamW."""
    loss, _ = module.batch_loss(batch, training=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure_train_step(ws: Workspace, settings: Settings) -> dict:
    """Median step time on an image batch (kl-f8 encode on the fly) and on the same images' cached latents."""
    images, cached = paired_batches(ws, settings.train_batch)
    module, optimizer = make_trainer(ws.model)
    steps = {"images (encode on the fly)": lambda: train_step(module, optimizer, images),
             "cached latents": lambda: train_step(module, optimizer, cached)}
    log.info("training steps, images and cached latents in turn ...")
    times = harness.alternate(steps, settings.warmup, settings.min_repeats, settings.max_repeats, settings.budget_s)
    image_s = harness.median_or_none(times["images (encode on the fly)"])
    cached_s = harness.median_or_none(times["cached latents"])
    speedup = image_s / cached_s
    return {
        "batch_size": settings.train_batch, "image_size": settings.size,
        "latent_shape": list(ws.model.latent_shape(settings.size, settings.size)),
        "unet_channels": settings.unet_channels, "unet_params": parameter_count(ws.model.unet),
        "autoencoder_params": parameter_count(ws.model.first_stage_model),
        "text_encoder_params": parameter_count(ws.model.cond_stage_model),
        "image_step_s": image_s, "cached_step_s": cached_s, "speedup": speedup,
        "repeats": len(times["cached latents"]), "target_speedup": TARGET_SPEEDUP,
        "meets_target": speedup >= TARGET_SPEEDUP,
        "step": "DiffusionTrainer.batch_loss (training=True) + backward + AdamW step (its configure_optimizers); "
                "no EMA; the tiny text encoder runs in both",
    }


# ---------------------------------------------------------------------------------------------------- processes


def subprocess_env(threads: int) -> dict:
    """The environment of a train-diffusion subprocess: ``threads`` torch threads, offline, the checkout importable
    (the tiny config's dataset is ``tests.helpers``), no launcher variables inherited from whoever runs this."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), LDM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "LDM_RUN_DIR"):
        env.pop(name, None)
    return env


def train_command(run_dir: Path, autoencoder: str, processes: int, batch: int, steps: int) -> list[str]:
    """``python -m ldm train-diffusion`` on the tiny config: ``processes`` x ``batch``, ``steps`` optimizer steps,
    a loss logged every step to TensorBoard (its wall times are the clock), nothing else on the way (no validation,
    image grids or step checkpoints: the final checkpoint and export come after the last logged step)."""
    samples = max(256, 4 * steps * processes * batch)  # epochs long enough that few steps start one
    return [sys.executable, "-m", "ldm", "train-diffusion", "--config", TINY_DIFFUSION_CONFIG,
            "--autoencoder", autoencoder, "--run-dir", str(run_dir), "--devices", str(processes),
            "--max-steps", str(steps), "lightning.accelerator=cpu", "lightning.logger=tensorboard",
            "lightning.log_every=1", "lightning.val_every=0", "lightning.image_every=0",
            f"lightning.checkpoint_every={10 ** 6}", f"data.batch_size={batch}",
            f"data.train.params.num_samples={samples}"]


def logged_wall_times(run_dir: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """``[(step, wall time)]`` of ``tag`` in the run's TensorBoard event files (``logs/tensorboard``), by step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points: dict[int, float] = {}
    for path in sorted((run_dir / "logs" / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(value.tag == tag for value in event.summary.value):
                points[int(event.step)] = float(event.wall_time)
    return sorted(points.items())


def step_seconds(points: list[tuple[int, float]], skip: int = 2) -> Optional[float]:
    """Median seconds per optimizer step from ``[(step, wall time)]``: differences of consecutive logged steps,
    divided by the steps between them, after the first ``skip`` points (warm-up: first batches, DDP buckets)."""
    points = sorted(points)[skip:]
    per_step = [(b_t - a_t) / (b_s - a_s) for (a_s, a_t), (b_s, b_t) in zip(points, points[1:]) if b_s > a_s]
    return statistics.median(per_step) if per_step else None


def run_training(root: Path, autoencoder: str, processes: int, batch: int, steps: int, threads: int) -> dict:
    """One train-diffusion subprocess; its step time, samples/s and what ``launch.json`` says it ran."""
    name = f"{processes}proc-b{batch}-t{threads}"
    run_dir = root / name
    start = time.perf_counter()
    done = subprocess.run(train_command(run_dir, autoencoder, processes, batch, steps), cwd=REPO,
                          env=subprocess_env(threads), capture_output=True, text=True, timeout=900)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"train-diffusion ({name}) exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    launch = json.loads((run_dir / "launch.json").read_text(encoding="utf-8"))[-1]
    points = logged_wall_times(run_dir)
    step_s = step_seconds(points)
    global_batch = processes * batch
    return {
        "name": name, "processes": processes, "threads_per_process": threads, "per_process_batch": batch,
        "global_batch": global_batch, "steps": steps, "steps_logged": len(points), "step_s": step_s,
        "samples_per_s": global_batch / step_s if step_s else None, "subprocess_wall_s": wall_s,
        "launch": {key: launch.get(key) for key in ("processes", "strategy", "per_device_batch", "global_batch")},
        "ran_as_asked": launch.get("processes") == processes and launch.get("global_batch") == global_batch,
    }


def measure_processes(root: Path, settings: Settings, threads: int = 1) -> dict:
    """1 process x 2B vs 2 processes x B (1 thread each), and, when ``threads`` (this run's, chosen for how busy the
    machine is) is at least 2, 1 x 2B on 2 threads: the same cores as two processes. On a busy machine two
    spin-waiting OpenMP threads measure the other jobs (ldm/threads.py), so that run is left out there."""
    from tests.helpers import make_tiny_autoencoder_file

    root.mkdir(parents=True, exist_ok=True)
    autoencoder = make_tiny_autoencoder_file(root / "tiny-autoencoder.safetensors", scale_factor=0.7)
    batch, steps = settings.process_batch, settings.process_steps
    same_cores = settings.same_cores_run and threads >= 2
    plan = [(1, 2 * batch, 1), (2, batch, 1)] + ([(1, 2 * batch, 2)] if same_cores else [])
    runs = []
    for processes, per_process, threads in plan:
        log.info("train-diffusion: %d process(es) x batch %d, %d thread(s) each, %d steps ...", processes,
                 per_process, threads, steps)
        runs.append(run_training(root, autoencoder, processes, per_process, steps, threads))
    one, two = runs[0], runs[1]
    return {
        "config": os.path.relpath(TINY_DIFFUSION_CONFIG, REPO), "global_batch": 2 * batch, "steps": steps,
        "runs": runs, "same_cores_run": same_cores,
        "two_over_one_step_time": (two["step_s"] / one["step_s"]) if one["step_s"] and two["step_s"] else None,
        "method": "TensorBoard wall time of each step's logged train/loss (log_every 1); median of the differences "
                  "of consecutive steps after the first 2; start-up, DDP set-up, final checkpoint and export excluded",
        "caveat": CAVEAT,
    }


# ---------------------------------------------------------------------------------------------------- output


def machine_info(threads: int) -> dict:
    return {
        "cpu": harness.cpu_name(), "usable_cores": harness.available_cores(), "threads": threads,
        "load_average_at_start": list(os.getloadavg()), "python": platform.python_version(),
        "torch": torch.__version__,
    }


def fmt_rate(value: Optional[float]) -> str:
    """Samples/s for a table: three significant digits, no exponent."""
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def data_markdown(data: dict) -> list[str]:
    rows = []
    what = {"folder": "decode + resize + random crop + kl-f8 encode (posterior sample)",
            "shards": "read tar + decode + resize + random crop + kl-f8 encode (posterior sample)",
            "cache": "load posterior mean/std + draw the sample"}
    for name, row in data["sources"].items():
        rows.append([name, what[name], fmt_rate(row["samples_per_s"]), harness.fmt_time(row["batch_s"]),
                     fmt_rate(row["load_only_samples_per_s"]), str(row["repeats"])])
    table = harness.markdown_table(["source", "per sample before the UNet", "samples/s",
                                    f"median per batch of {data['batch_size']}", "load only: samples/s",
                                    "repeats"], rows)
    return [
        f"## 1. Data throughput at {data['image_size']} px (latents {'x'.join(map(str, data['latent_shape']))})",
        "",
        f"{data['num_images']} generated photo-like images (JPEG and PNG, sides 1.15-1.6x {data['image_size']} px), "
        f"`build_dataloader(dataset_node(...))`, batch {data['batch_size']}, num_workers 0; kl-f8 random init "
        f"({data['autoencoder_params'] / 1e6:.1f}M parameters). Sources called in turn, one batch each, medians.",
        "",
        table,
        "",
        f"- **cache / folder: {data['cache_over_folder']:.0f}x** the samples/s (shards / folder "
        f"{data['shards_over_folder']:.2f}x)",
        f"- one-off costs: writing the shards {data['shards_build_s']:.2f} s; `cache-latents` "
        f"{data['cache_build_s']:.1f} s ({data['cache_build_samples_per_s']:.3g} images/s, center crop)",
        "",
    ]


def train_markdown(train: dict) -> list[str]:
    rows = [["images (kl-f8 encode on the fly)", harness.fmt_time(train["image_step_s"])],
            ["cached latents", harness.fmt_time(train["cached_step_s"])]]
    return [
        f"## 2. Training step: cached latents vs encoding on the fly",
        "",
        f"`DiffusionTrainer.batch_loss` + backward + AdamW, batch {train['batch_size']} at {train['image_size']} px "
        f"(latents {'x'.join(map(str, train['latent_shape']))}); SD-v1-shaped UNet at model_channels "
        f"{train['unet_channels']} ({train['unet_params'] / 1e6:.1f}M parameters), kl-f8 "
        f"({train['autoencoder_params'] / 1e6:.1f}M), tiny open_clip text tower ({train['text_encoder_params'] / 1e6:.1f}M); "
        f"alternating after warm-up, median of {train['repeats']} each.",
        "",
        harness.markdown_table(["batch", "step time"], rows),
        "",
        f"- **speed-up with the cache: {train['speedup']:.2f}x** (target >= {train['target_speedup']}x: "
        f"{'met' if train['meets_target'] else 'NOT met'}); the difference, "
        f"{harness.fmt_time(train['image_step_s'] - train['cached_step_s'])} a step, is the kl-f8 encode of "
        f"{train['batch_size']} images, so the speed-up depends on the UNet's share: a wider UNet gains less.",
        "",
    ]


def processes_markdown(proc: dict) -> list[str]:
    rows = []
    for run in proc["runs"]:
        rows.append([f"{run['processes']} x {run['per_process_batch']}", str(run["threads_per_process"]),
                     str(run["global_batch"]), harness.fmt_time(run["step_s"]), fmt_rate(run["samples_per_s"]),
                     f"{run['subprocess_wall_s']:.0f} s", f"{run['launch']['processes']} proc, {run['launch']['strategy']}, "
                     f"global {run['launch']['global_batch']}" + ("" if run["ran_as_asked"] else " (MISMATCH)")])
    table = harness.markdown_table(["processes x batch", "threads each", "global batch", "time per optimizer step",
                                    "samples/s", "subprocess wall", "launch.json"], rows)
    ratio = proc["two_over_one_step_time"]
    return [
        f"## 3. One process vs two (`python -m ldm train-diffusion --devices 1|2 lightning.accelerator=cpu`)",
        "",
        f"`{proc['config']}` (16 px, tiny UNet), {proc['steps']} steps, same global batch {proc['global_batch']}. "
        f"Step time: {proc['method']}.",
        "",
        table,
        "",
        f"- 2 processes / 1 process step time: {harness.fmt_num(ratio, '.2f')}",
        *([] if proc.get("same_cores_run") else
          ["- 1 process on 2 threads (the cores of two processes) not run: this run's --threads was 1"]),
        f"- **Caveat**: {proc['caveat']}.",
        "",
    ]


def report_markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"# Training beyond one process: CPU measurements ({'quick' if results['quick'] else 'full'} run, "
        f"{results['elapsed_s']:.0f} s)",
        "",
        f"- CPU: {machine['cpu']}, {machine['usable_cores']} usable cores, torch threads {machine['threads']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in machine['load_average_at_start'])}",
        f"- torch {machine['torch']}, Python {machine['python']}",
        f"- command: `{results['command']}`",
        "- seconds per part: " + ", ".join(f"{name} {sec:.0f}" for name, sec in results["part_seconds"].items()),
    ]
    if results.get("note"):
        lines.append(f"- note: {results['note']}")
    lines.append("")
    if "data" in results:
        lines += data_markdown(results["data"])
    if "train" in results:
        lines += train_markdown(results["train"])
    if "processes" in results:
        lines += processes_markdown(results["processes"])
    return "\n".join(lines).rstrip() + "\n"


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models and images, few repeats")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    parser.add_argument("--md", metavar="OUT", help="write the report as markdown to OUT")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of this process (default: LDM_THREADS, else the idle cores); the "
                             "train-diffusion subprocesses use 1 each, and a 1-process run on 2 threads is added "
                             "when this is >= 2")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {list(PARTS)}")
    parser.add_argument("--note", default="", help="a line for the report (e.g. the machine was busy)")
    args = parser.parse_args(argv)
    args.command = None  # what the report says was run; main() fills it in
    args.parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        parser.error(f"--only {unknown}: choose from {list(PARTS)}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def finish(results: dict, started: float) -> dict:
    """Stamp the end load and elapsed time and render the markdown: after every part, so that what is measured is
    written even when a later part fails or the run is stopped."""
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["elapsed_s"] = time.perf_counter() - started
    results["markdown"] = report_markdown(results)
    return results


def run(args: argparse.Namespace, workdir: Path, on_part: Callable[[dict], None] = lambda results: None) -> dict:
    """Every part asked for, into one results dict (markdown included); ``on_part(results)`` after each part."""
    from ldm.threads import configure_threads

    started = time.perf_counter()
    threads = configure_threads(args.threads)
    settings = QUICK if args.quick else FULL
    results: dict[str, Any] = {"machine": machine_info(threads), "quick": args.quick, "settings": asdict(settings),
                               "command": args.command, "note": args.note, "part_seconds": {}}

    def part(name: str, measure: Callable[[], dict]) -> None:
        start = time.perf_counter()
        results[name] = measure()
        results["part_seconds"][name] = time.perf_counter() - start
        on_part(finish(results, started))

    if "data" in args.parts or "train" in args.parts:
        start = time.perf_counter()
        ws = prepare_workspace(workdir / "sources", settings, threads)
        results["part_seconds"]["prepare"] = time.perf_counter() - start
        if "data" in args.parts:
            part("data", lambda: measure_data(ws, settings))
        if "train" in args.parts:
            part("train", lambda: measure_train_step(ws, settings))
        del ws
    if "processes" in args.parts:
        part("processes", lambda: measure_processes(workdir / "processes", settings, threads))
    return finish(results, started)


def write_outputs(results: dict, args: argparse.Namespace) -> None:
    if args.json:
        write_text(args.json, json.dumps(results, indent=2) + "\n")
    if args.md:
        write_text(args.md, results["markdown"])


def main(argv=None, command: Optional[str] = None) -> dict:
    """Run, print the markdown, write ``--json``/``--md`` (after each part too); returns the results. ``command``:
    what the report says was run (default: this process's arguments)."""
    args = parse_args(argv)
    args.command = command or shlex.join(["python", "benchmarks/scale.py", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # a SIGTERM (timeout, a scheduler) unwinds through the finally below, so the temp folder does not stay behind
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(tempfile.mkdtemp(prefix="ldm-scale-"))
    try:
        results = run(args, workdir, on_part=lambda partial: write_outputs(partial, args))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    print(results["markdown"])
    write_outputs(results, args)
    for path in filter(None, (args.json, args.md)):
        log.info("wrote %s", path)
    return results


if __name__ == "__main__":
    main()
