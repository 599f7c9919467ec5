"""Export the EMA weights of a diffusion training checkpoint as one ``.safetensors`` file for txt2img.

    python scripts/export_diffusion.py --run runs/<run> --autoencoder runs/<ae-run>/autoencoder.safetensors \
        [--ckpt runs/<run>/checkpoints/step002000.ckpt] [--out model.safetensors] [--dtype float16] [--weights raw]

``--weights raw`` writes the optimizer's weights instead of their moving average (to measure what the EMA adds).

``train_diffusion.py`` exports at the end of training; this does the same for any checkpoint of a run (an
interrupted run, or an earlier step), using the run's ``config.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os


import torch

from ldm.cli import run
from ldm.threads import add_threads_argument, configure_threads
from ldm.training import find_resume_checkpoint
from ldm.util import add_allow_target_argument, instantiate_from_config, load_config, to_container
from ldm.cli.train_diffusion import build_model

log = logging.getLogger("export_diffusion")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the training run folder (holds config.yaml)")
    parser.add_argument("--autoencoder", default=None, help="the stage-one weights the run was trained with")
    parser.add_argument("--init-from", default=None, help="or the whole-model file the run started from")
    parser.add_argument("--ckpt", default=None, help="a Lightning checkpoint; default: the run's last.ckpt")
    parser.add_argument("--out", default=None, help="default: <run>/model.safetensors")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--weights", default="ema", choices=["ema", "raw"],
                        help="the EMA weights (default, what sampling uses) or the raw (optimizer's) weights")
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser.parse_args(argv)


def export(run: str, autoencoder: str | None, ckpt: str | None = None, out: str | None = None,
           dtype: str = "float32", init_from: str | None = None, weights: str = "ema") -> str:
    """Rebuild the run's model, load the checkpoint (raw + EMA), write the EMA (or ``weights="raw"``: the raw)
    weights; returns the path."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    config = load_config(os.path.join(run, "config.yaml"), trusted=False)  # a run folder may come from anyone
    ckpt = ckpt or str(find_resume_checkpoint(run)[0])
    model = build_model(to_container(config.model), autoencoder, init_from)
    module = instantiate_from_config(config.trainer, path="trainer", model=model)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    out = out or os.path.join(run, "model.safetensors")
    step = int(checkpoint.get("global_step", -1))
    if weights == "ema" and module.model_ema is None:
        log.warning("%s: the run was trained without EMA (ema_decay: null): exporting its raw weights", ckpt)
        weights = "raw"
    with module.ema_weights() if weights == "ema" else contextlib.nullcontext():
        model.save(out, dtype=getattr(torch, dtype), extra_metadata={"global_step": step, "weights": weights})
    log.info("exported step %d (%s weights) of %s to %s (%.1f MiB)", step, weights, ckpt, out, os.path.getsize(out) / 2**20)
    return out


def main(argv=None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    return export(args.run, args.autoencoder, args.ckpt, args.out, args.dtype, args.init_from, args.weights)


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
