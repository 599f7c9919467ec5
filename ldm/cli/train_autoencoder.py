"""Train the KL autoencoder (Stable Diffusion's first stage) and write its weights with the latent scale factor.

    python scripts/train_autoencoder.py --config configs/autoencoder/shapes-kl-f4.yaml \
        [--data DIR] [--max-steps N] [--max-minutes M] [--resume PATH] [--run-dir DIR] [key=value ...]

The run folder (default ``runs/<config name>-<time>/``) receives ``config.yaml``, Lightning checkpoints
(``checkpoints/last.ckpt`` resumes with ``--resume``), reconstruction grids (inputs over reconstructions,
``images/reconstruction_step<N>.png``), scalar logs (``logs/version_<N>/metrics.csv``, TensorBoard when installed) and
``autoencoder.safetensors``: the ``AutoencoderKL`` state dict with the model config, the data config and the
latent ``scale_factor`` (1 / std of posterior samples) in its metadata, read by ``autoencoder.load_autoencoder``.

``--data DIR`` trains on a folder of images (``ldm.data.image_folder.CaptionedImageFolder``; ``DIR/train`` and
``DIR/validation`` are used when present) instead of the config's dataset. Trailing ``key=value`` items override
the config (e.g. ``lightning.precision=bf16-mixed``).

Config sections: ``model`` (target + params of ``autoencoder.lightning.AutoencoderKLTraining``; optional
``base_learning_rate`` scaled by the batch size when ``lightning.scale_lr`` is true, as CompVis does),
``data`` (``params.batch_size``, ``params.num_workers``, ``params.train``/``params.validation`` dataset nodes) and
``lightning`` (max_steps, max_minutes, precision, log_every, image_every, checkpoint_every, val_every,
limit_val_batches, seed, scale_factor_batches, accelerator).
"""

from __future__ import annotations

import argparse
import logging
import os


import torch

from autoencoder.io import save_autoencoder
from autoencoder.losses import PerceptualWeightsUnavailable
from autoencoder.scale import latent_statistics
from ldm.cli import run
from ldm.run_folder import find_resume_checkpoint, make_run_dir, training_session
from ldm.threads import add_threads_argument, configure_threads
from ldm.training import (
    RESUMABLE_LIGHTNING_KEYS,
    build_dataloaders,
    exit_if_stopped,
    lightning_settings,
    steps_summary,
    trainer_from_settings,
)
from ldm.util import (
    add_allow_target_argument,
    check_keys,
    instantiate_from_config,
    load_config,
    to_container,
)

log = logging.getLogger("train_autoencoder")
WEIGHTS_NAME = "autoencoder.safetensors"
IMAGE_FOLDER_TARGET = "ldm.data.image_folder.CaptionedImageFolder"
# what a --resume may change: the step budget, logging intervals and the learning rate
RESUMABLE_KEYS = tuple(f"lightning.{key}" for key in RESUMABLE_LIGHTNING_KEYS) + (
    "model.params.learning_rate", "model.base_learning_rate")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="configs/autoencoder/<name>.yaml (default with --resume: the run's config.yaml)")
    parser.add_argument("--data", default=None, help="train on this image folder instead of the config's dataset")
    parser.add_argument("--max-steps", type=int, default=None, help="override lightning.max_steps")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this much training time (counted across resumes; 0: no limit)")
    parser.add_argument("--resume", default=None, help="a Lightning checkpoint or a run folder (uses checkpoints/last.ckpt)")
    parser.add_argument("--run-dir", default=None, help="default: runs/<config name>-<time> (or the resumed run)")
    parser.add_argument("overrides", nargs="*", help="config overrides as a dotlist, e.g. lightning.precision=bf16-mixed")
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser.parse_args(argv)


def data_section(data_config) -> dict:
    """The dict holding ``train``/``validation``/``batch_size`` (``data.params`` or ``data`` itself)."""
    data = to_container(data_config) or {}
    return data["params"] if isinstance(data.get("params"), dict) else data


def image_folder_nodes(root: str, size: int) -> dict:
    """Dataset nodes for a folder of images: random crops + flips to train, center crops to validate.

    ``root/train`` and ``root/validation`` (or ``root/val``) are used when they exist; otherwise the whole
    folder serves both (the validation numbers are then not held out).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data: not a directory: {root}")
    train_root, val_root = root, root
    if os.path.isdir(os.path.join(root, "train")):
        train_root = os.path.join(root, "train")
        for name in ("validation", "val"):
            if os.path.isdir(os.path.join(root, name)):
                val_root = os.path.join(root, name)
                break
        else:
            val_root = train_root
    return {
        "train": {"target": IMAGE_FOLDER_TARGET,
                  "params": {"root": train_root, "size": size, "crop": "random", "flip": True, "caption_source": "none"}},
        "validation": {"target": IMAGE_FOLDER_TARGET,
                       "params": {"root": val_root, "size": size, "crop": "center", "flip": False,
                                  "caption_source": "none"}},
    }


def image_size(config) -> int:
    train = data_section(config.get("data")).get("train") or {}
    size = (train.get("params") or {}).get("size")
    return int(size) if size else int(config.model.params.ddconfig.resolution)


def apply_learning_rate(config) -> float:
    """CompVis: ``lr = base_learning_rate * batch_size`` (one device, no accumulation) when ``lightning.scale_lr``."""
    params = config.model.params
    base = config.model.get("base_learning_rate")
    if base is None:
        if params.get("learning_rate") is None:
            raise ValueError("model.params.learning_rate or model.base_learning_rate must be set")
        return float(params.learning_rate)
    lr = float(base)
    if config.get("lightning", {}).get("scale_lr", False):
        lr *= int(data_section(config.data).get("batch_size", 16))
    params.learning_rate = lr
    return lr


def main(argv=None) -> str:
    """Train; returns the path of the written ``autoencoder.safetensors``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    resume_ckpt = None
    config_from_run = False
    if args.resume:
        resume_ckpt, resumed_run = find_resume_checkpoint(args.resume)
        if args.config is None:
            args.config = os.path.join(resumed_run, "config.yaml")
            config_from_run = True
    if args.config is None:
        raise SystemExit("error: --config is required (or --resume a run folder that has config.yaml)")
    # the run folder's own config.yaml is a file someone else may have written; a --config is the user's
    config = load_config(args.config, overrides=args.overrides, trusted=not config_from_run)
    check_keys(config, ("model", "data", "lightning"), "config")
    check_keys(config.model, ("target", "params", "base_learning_rate"), "model")
    for section in ("model", "data"):
        if section not in config:
            raise SystemExit(f"error: {args.config} has no '{section}' section")
    if "lightning" not in config:
        config.lightning = {}
    if args.data:
        nodes = image_folder_nodes(args.data, image_size(config))
        target = config.data.params if "params" in config.data else config.data
        target.train = nodes["train"]
        target.validation = nodes["validation"]
    if args.max_steps is not None:
        config.lightning.max_steps = args.max_steps
    if args.max_minutes is not None:
        config.lightning.max_minutes = args.max_minutes
    settings = lightning_settings(config.lightning, image_every=500)
    lr = apply_learning_rate(config)
    seed = settings["seed"]
    import pytorch_lightning as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    try:
        module = instantiate_from_config({"target": config.model.target, "params": config.model.get("params")},
                                         path="model")
    except PerceptualWeightsUnavailable as error:
        raise SystemExit(f"error: {error}") from None
    train_loader, val_loader = build_dataloaders(config.data, seed=seed)
    # Only now: a bad model or data config fails without leaving an empty run folder behind.
    name = os.path.splitext(os.path.basename(args.config))[0]
    if args.resume and name == "config":
        name = os.path.basename(os.path.normpath(str(resumed_run)))
    run_dir = make_run_dir(args.run_dir, name, resume_ckpt)
    with training_session(run_dir, config, resume_ckpt, RESUMABLE_KEYS):
        trainer = trainer_from_settings(run_dir, settings, train_loader, val_loader)
        log.info("run folder %s; learning rate %.3g; %d parameters", run_dir, lr,
                 sum(p.numel() for p in module.autoencoder.parameters()))
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
        trainer.save_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"), weights_only=False)
        log.info("training: %s (%d in all)", steps_summary(trainer.step_timer), trainer.global_step)

        autoencoder = module.inference_autoencoder().to("cpu").eval()  # the EMA weights when the config keeps them
        stats = latent_statistics(
            autoencoder, train_loader, num_batches=settings["scale_factor_batches"],
            generator=torch.Generator().manual_seed(seed),
        )
        print(f"latent mean {stats.mean:.5f}  std {stats.std:.5f}  -> scale_factor {stats.scale_factor:.5f} "
              f"({stats.count} latent values)")
        weights = run_dir / WEIGHTS_NAME
        save_autoencoder(
            weights, autoencoder, scale_factor=stats.scale_factor,
            metadata={
                "data_config": to_container(config.data),
                "latent_mean": repr(stats.mean),
                "latent_std": repr(stats.std),
                "global_step": str(trainer.global_step),
                "steps_per_second": repr(trainer.step_timer.steps_per_second),
            },
        )
    print(f"trained {steps_summary(trainer.step_timer)} this session, {trainer.global_step} in all; weights: {weights}")
    exit_if_stopped(trainer)
    return str(weights)


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
