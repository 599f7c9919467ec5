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
from ldm.data.sources import train_val_nodes
from ldm.run_folder import find_resume_checkpoint
from ldm.threads import add_threads_argument, configure_threads
from ldm.training import (
    RESUMABLE_LIGHTNING_KEYS,
    add_data_arguments,
    add_scale_arguments,
    apply_scale_arguments,
    set_learning_rate,
    training_run,
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
    add_data_arguments(parser, "an image folder")
    parser.add_argument("--max-steps", type=int, default=None, help="override lightning.max_steps")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this much training time (counted across resumes; 0: no limit)")
    parser.add_argument("--resume", default=None, help="a Lightning checkpoint or a run folder (uses checkpoints/last.ckpt)")
    parser.add_argument("--run-dir", default=None, help="default: runs/<config name>-<time> (or the resumed run)")
    parser.add_argument("overrides", nargs="*", help="config overrides as a dotlist, e.g. lightning.precision=bf16-mixed")
    add_scale_arguments(parser)
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser.parse_args(argv)


def data_section(data_config) -> dict:
    """The dict holding ``train``/``validation``/``batch_size`` (``data.params`` or ``data`` itself)."""
    data = to_container(data_config) or {}
    return data["params"] if isinstance(data.get("params"), dict) else data


def image_folder_nodes(root: str, size: int, val_fraction: float = 0.02, seed: int = 0,
                       epoch_length: int | None = None) -> dict:
    """``{"train", "validation"}`` dataset nodes for ``--data root`` without captions (random crops + flips to
    train, center crops to validate; :func:`ldm.data.sources.train_val_nodes` picks the validation set, and
    ``"validation"`` is ``None`` when there is none)."""
    train, validation, how = train_val_nodes(root, size, val_fraction, seed, caption_source="none", flip=True,
                                             epoch_length=epoch_length)
    log.info("--data %s: validation set: %s", root, how)
    return {"train": train, "validation": validation}


def image_size(config) -> int:
    train = data_section(config.get("data")).get("train") or {}
    size = (train.get("params") or {}).get("size")
    return int(size) if size else int(config.model.params.ddconfig.resolution)


def base_learning_rate(config) -> float:
    """``model.base_learning_rate`` (CompVis: scaled by the global batch when ``lightning.scale_lr``, see
    :func:`ldm.training.set_learning_rate`) or else ``model.params.learning_rate`` as it is."""
    params = config.model.params
    base = config.model.get("base_learning_rate")
    if base is None:
        if params.get("learning_rate") is None:
            raise ValueError("model.params.learning_rate or model.base_learning_rate must be set")
        return float(params.learning_rate)
    params.learning_rate = float(base)  # the module needs one; set_learning_rate scales it for the launch
    return float(base)


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
        nodes = image_folder_nodes(args.data, image_size(config), args.val_fraction,
                                   int((config.get("lightning") or {}).get("seed", 0)), args.epoch_length)
        target = config.data.params if "params" in config.data else config.data
        target.train = nodes["train"]
        target.validation = nodes["validation"]
    if args.max_steps is not None:
        config.lightning.max_steps = args.max_steps
    if args.max_minutes is not None:
        config.lightning.max_minutes = args.max_minutes
    apply_scale_arguments(config, args)
    settings = lightning_settings(config.lightning, image_every=500)
    lr = base_learning_rate(config)
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
    module.accumulate_grad_batches = settings["accumulate_grad_batches"]  # manual optimization accumulates itself
    with training_run(args.run_dir, name, resume_ckpt, config, RESUMABLE_KEYS, settings) as run_dir:
        trainer = trainer_from_settings(run_dir, settings, train_loader, val_loader, automatic_optimization=False)
        lr = set_learning_rate(trainer, module, lr, train_loader.batch_size or 1, settings)
        log.info("run folder %s; learning rate %.3g; %d parameters", run_dir, lr,
                 sum(p.numel() for p in module.autoencoder.parameters()))
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
        log.info("training: %s (%d in all)", steps_summary(trainer.step_timer), trainer.global_step)
        if not trainer.is_global_zero:
            return None  # rank 0 measures the scale factor and writes the weights

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
