"""Train the text-conditioned UNet on the latents of a frozen, trained autoencoder.

    python scripts/train_diffusion.py --config configs/latent-diffusion/shapes.yaml \
        --autoencoder runs/ae/autoencoder.safetensors [--data DIR] [--max-steps N] [--resume PATH]
    python scripts/train_diffusion.py --config ... --init-from model.safetensors   # continue / fine-tune

The run folder holds ``config.yaml``, Lightning checkpoints (``checkpoints/last.ckpt`` resumes), sample
grids for the config's fixed prompts (``images/``), scalar logs (``logs/``) and the final EMA weights as
``model.safetensors`` with the full config (autoencoder, text encoder, UNet, schedule) in its metadata:
that one file is all ``scripts/txt2img.py`` needs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


import pytorch_lightning as pl
import torch

from autoencoder import load_autoencoder
from ldm.checkpoint import load_config_from_checkpoint, load_into, load_state_dict
from ldm.cli import run
from ldm.inpainting import widen_input_conv
from ldm.interop import add_checkpoint_arguments, is_our_format, load_single_file
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.run_folder import find_resume_checkpoint
from ldm.threads import add_threads_argument, configure_threads
from ldm.data.sources import train_val_nodes
from ldm.training import (
    RESUMABLE_LIGHTNING_KEYS,
    add_data_arguments,
    add_scale_arguments,
    apply_scale_arguments,
    build_dataloaders,
    data_captions,
    exit_if_stopped,
    lightning_settings,
    set_learning_rate,
    trainer_from_settings,
    training_run,
)
from ldm.util import (
    ConfigError,
    add_allow_target_argument,
    check_keys,
    instantiate_from_config,
    load_config,
    to_container,
)

log = logging.getLogger("train_diffusion")
TOP_LEVEL_KEYS = {"model", "trainer", "data", "lightning"}
# what a --resume may change: the step budget, logging intervals and the learning rate
RESUMABLE_KEYS = tuple(f"lightning.{key}" for key in RESUMABLE_LIGHTNING_KEYS) + ("trainer.params.learning_rate",)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="configs/latent-diffusion/<name>.yaml (default with --resume: the run's config.yaml)")
    parser.add_argument("--autoencoder", default=None, help="stage-one weights (.safetensors with scale_factor)")
    parser.add_argument("--init-from", default=None,
                        help="start from a trained model file (train_diffusion/export output): fine-tuning or "
                             "longer training; its autoencoder and scale factor are used, --autoencoder is not needed")
    add_checkpoint_arguments(parser, "--config-from")  # with --init-from an original Stable Diffusion file
    add_data_arguments(parser, "a captioned image folder, a latent cache (ldm cache-latents)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--resume", default=None,
                        help="a run folder (its newest valid checkpoint) or a Lightning checkpoint file")
    parser.add_argument("--run-dir", default=None, help="default: runs/<config name>-<time>")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotlist, e.g. trainer.params.learning_rate=1e-4")
    add_scale_arguments(parser)
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser.parse_args(argv)


def check_config(config) -> None:
    check_keys(config, TOP_LEVEL_KEYS, "config")
    for key in ("trainer", "data"):
        if key not in config:
            raise ConfigError(f"config has no '{key}' section")


def build_model(model_config: dict, autoencoder_path: str | None = None, init_from: str | None = None,
                config_from: str | None = None, parameterization: str | None = None,
                use_ema: bool | None = None) -> LatentDiffusion:
    """The frozen stage-one autoencoder (with its stored scale factor) + text encoder + UNet + schedule.

    With ``init_from`` (a whole-model file), every weight starts from that file, autoencoder included. An original
    Stable Diffusion file (with ``config_from``, its original inference YAML, or its stock config) brings the whole
    model, architecture, schedule, parameterization and scale factor included: ``model_config`` is not used.
    """
    if (autoencoder_path is None) == (init_from is None):
        raise ValueError("give exactly one of --autoencoder (stage-one weights) or --init-from (a whole model)")
    if init_from is not None and (config_from is not None or not is_our_format(init_from)):
        return load_single_file(init_from, config=config_from, parameterization=parameterization, use_ema=use_ema)
    if config_from is not None or use_ema or parameterization:
        raise ValueError("--config-from, --parameterization and --use-ema are for --init-from an original Stable "
                         "Diffusion file")
    if init_from is not None:
        stored = load_config_from_checkpoint(init_from)
        if "autoencoder" not in stored or "scale_factor" not in stored:
            raise ValueError(f"--init-from {init_from}: not a whole-model file (its config has no autoencoder/scale_factor)")
        model = LatentDiffusion.from_config({**model_config, "autoencoder": stored["autoencoder"]},
                                            scale_factor=stored["scale_factor"])
        state = load_state_dict(init_from)
        if model.config.get("inpainting"):  # an inpainting UNet started from a text-to-image model
            state = widen_input_conv(state, model)
        load_into(model, state, what=f"model config (--init-from {init_from})")
        return model
    autoencoder, scale_factor = load_autoencoder(autoencoder_path)  # no stored scale factor: a clear error
    full = {**model_config, "autoencoder": load_config_from_checkpoint(autoencoder_path)}
    return LatentDiffusion.from_config(full, autoencoder=autoencoder, scale_factor=scale_factor)


def main(argv=None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    resume_ckpt, resumed_run = find_resume_checkpoint(args.resume) if args.resume else (None, None)
    config_path = args.config or (os.path.join(resumed_run, "config.yaml") if resumed_run else None)
    if config_path is None:
        raise SystemExit("error: --config is required (or --resume a run folder, which brings its config.yaml)")
    # a run folder's config.yaml may come from anyone: its targets must be on the allow-list
    config = load_config(config_path, overrides=args.overrides, trusted=args.config is not None)
    check_config(config)
    if args.max_steps is not None:
        config.lightning = {**to_container(config.get("lightning") or {}), "max_steps": args.max_steps}
    apply_scale_arguments(config, args)
    settings = lightning_settings(config.get("lightning"), image_every=1000)

    pl.seed_everything(settings["seed"])  # the frozen random text tower depends on it
    model = build_model(to_container(config.get("model") or {}), args.autoencoder, args.init_from, args.config_from,
                        args.parameterization, args.use_ema or None)
    if args.init_from and (args.config_from or not is_our_format(args.init_from)):
        # a Stable Diffusion file brought its own model: the run's config says what is trained
        log.info("the model comes from %s; config.yaml records its architecture", args.init_from)
        config.model = model.config
    if args.data:
        data = config.data.params if "params" in config.data else config.data
        # no flips: a caption that says "left" must stay true of its image
        data.train, validation, how = train_val_nodes(args.data, (model.config or {}).get("image_size", 64),
                                                      args.val_fraction, settings["seed"],
                                                      epoch_length=args.epoch_length)
        data.validation = validation
        log.info("--data %s: validation set: %s", args.data, how)
    train_loader, val_loader = build_dataloaders(config.data, seed=settings["seed"])
    if hasattr(train_loader.dataset, "check_compatible"):  # a latent cache made with another autoencoder: refused
        # a text encoder that trains encodes the captions itself: cached contexts do not have to match it
        trainable = bool((config.trainer.get("params") or {}).get("cond_stage_trainable", False))
        train_loader.dataset.check_compatible(model, text_encoder=not trainable)
    if args.data and not any(item.startswith("trainer.params.sample_prompts") for item in args.overrides):
        # grids of the data's own captions, not the config's shapes prompts
        captions = data_captions(train_loader.dataset)
        if captions:
            config.trainer.params.sample_prompts = captions
    module = instantiate_from_config(config.trainer, path="trainer", model=model)
    # Only now: a bad model, trainer or data config fails without leaving an empty run folder behind.
    name = os.path.splitext(os.path.basename(args.config or str(resumed_run)))[0]
    with training_run(args.run_dir, name, resume_ckpt, config, RESUMABLE_KEYS, settings) as run_dir:
        trainer = trainer_from_settings(run_dir, settings, train_loader, val_loader)
        set_learning_rate(trainer, module, module.learning_rate, train_loader.batch_size or 1, settings)
        start = time.perf_counter()
        try:
            trainer.fit(module, train_loader, val_loader, ckpt_path=resume_ckpt)
        except SystemExit:
            # Lightning turns a second Ctrl-C into sys.exit(1) after a graceful shutdown: keep what was learnt.
            if not trainer.interrupted:
                raise
            log.warning("interrupted at step %d: exporting the EMA weights so far", trainer.global_step)
        minutes = (time.perf_counter() - start) / 60
        if not trainer.is_global_zero:
            return None  # rank 0 exports

        weights = os.path.join(run_dir, "model.safetensors")
        export_dtype = getattr(torch, settings["export_dtype"])
        with module.ema_weights():  # sampling and export use the EMA weights
            model.save(weights, dtype=export_dtype, extra_metadata={"global_step": trainer.global_step})
    log.info("%s in %.1f min (%d in all); EMA weights written to %s",
             f"{trainer.step_timer.steps} steps this session", minutes, trainer.global_step, weights)
    exit_if_stopped(trainer)
    return weights


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
