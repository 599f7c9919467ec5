"""Checkpoint interop: original Stable Diffusion files and diffusers folders, in and out.

* :mod:`ldm.interop.sd_config`: SD's original inference YAML mapped to our config (class names mapped, not imported);
* :mod:`ldm.interop.single_file`: SD ``.ckpt``/``.safetensors`` read by content, checked and loaded strictly;
* :mod:`ldm.interop.diffusers`: a ``StableDiffusionPipeline`` folder written and read (an optional extra);
* :mod:`ldm.interop.export`: ``convert_checkpoint`` between ours, SD's single file and diffusers;
* :func:`load_model`: one entry point for all of them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ldm.interop.sd_config import load_sd_config, sd_config_to_ours, stock_config_path
from ldm.checkpoint import CheckpointFormatError
from ldm.interop.single_file import infer_variant, load_single_file


def is_our_format(path: str | os.PathLike) -> bool:
    """A ``.safetensors`` file written by ``LatentDiffusion.save`` (its config in the metadata)."""
    from ldm.checkpoint import is_safetensors_file, read_safetensors_metadata

    path = os.fspath(path)
    if not os.path.isfile(path) or not is_safetensors_file(path):
        return False
    try:
        return "config" in read_safetensors_metadata(path)
    except Exception:  # a damaged file: the SD reader gives the precise error
        return False


def add_checkpoint_arguments(parser, config_flag: str = "--config") -> None:
    """The options that say how to read an original Stable Diffusion file: ``config_flag`` (its inference YAML),
    ``--parameterization``, ``--use-ema``."""
    parser.add_argument(config_flag, default=None,
                        help="for an original Stable Diffusion file: its inference YAML (v1-inference.yaml, "
                             "v2-inference-v.yaml, ...); default: the variant read off the weights")
    parser.add_argument("--parameterization", default=None, choices=["eps", "v", "x0"],
                        help="what a Stable Diffusion file's UNet predicts when no YAML says it (768-v: v)")
    parser.add_argument("--use-ema", action="store_true", help="a Stable Diffusion file's model_ema weights")


def load_model(
    path: str | os.PathLike,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    parameterization: str | None = None,
    use_ema: bool | None = None,
    map_location: str = "cpu",
):
    """A :class:`LatentDiffusion` from our one-file format, an original SD checkpoint (with its SD ``config``) or a
    diffusers folder (``model_index.json``)."""
    from ldm.interop.diffusers import is_diffusers_folder, load_diffusers
    from ldm.models.latent_diffusion import LatentDiffusion

    if os.path.isdir(path) and not is_diffusers_folder(path):
        raise ValueError(f"{path}: a folder, but not a diffusers pipeline (no model_index.json)")
    if is_diffusers_folder(path):
        if config is not None or use_ema:
            raise ValueError(f"{path}: a diffusers folder carries its own config and weights; --config and --use-ema "
                             "are for Stable Diffusion files")
        model, says = load_diffusers(path).to(map_location), "its scheduler says so"
    elif config is None and is_our_format(path):
        if use_ema:
            raise ValueError(f"{path}: our own files hold the EMA weights already; --use-ema is for SD checkpoints")
        model, says = LatentDiffusion.from_checkpoint(path, map_location=map_location), "its config says so"
    else:
        return load_single_file(path, config=config, parameterization=parameterization, use_ema=use_ema,
                                map_location=map_location)
    # these formats state their parameterization: a flag may only agree with it
    if parameterization is not None and parameterization != model.parameterization:
        raise ValueError(f"{path} is a {model.parameterization}-prediction model ({says}); "
                         f"--parameterization {parameterization} contradicts it")
    return model


__all__ = ["CheckpointFormatError", "add_checkpoint_arguments", "infer_variant", "is_our_format", "load_model", "load_sd_config",
           "load_single_file", "sd_config_to_ours", "stock_config_path"]
