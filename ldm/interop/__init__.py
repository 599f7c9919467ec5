"""Checkpoint interop: original Stable Diffusion files in (and, later, SD single files and diffusers folders out).

* :mod:`ldm.interop.sd_config`: SD's original inference YAML mapped to our config (class names mapped, not imported);
* :mod:`ldm.interop.single_file`: SD ``.ckpt``/``.safetensors`` read by content, checked and loaded strictly;
* :func:`load_model`: one entry point for our own one-file format and SD files alike.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ldm.interop.sd_config import load_sd_config, sd_config_to_ours, stock_config_path
from ldm.interop.single_file import (
    CheckpointFormatError,
    infer_variant,
    load_single_file,
    read_state_dict,
)


def is_our_format(path: str | os.PathLike) -> bool:
    """A ``.safetensors`` file written by ``LatentDiffusion.save`` (its config in the metadata)."""
    from ldm.checkpoint import read_safetensors_metadata
    from ldm.interop.single_file import _is_safetensors

    path = os.fspath(path)
    if not os.path.isfile(path) or not _is_safetensors(path):
        return False
    try:
        return "config" in read_safetensors_metadata(path)
    except Exception:  # a damaged file: the SD reader gives the precise error
        return False


def load_model(
    path: str | os.PathLike,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    parameterization: str | None = None,
    use_ema: bool | None = None,
    map_location: str = "cpu",
):
    """A :class:`LatentDiffusion` from our one-file format or an original SD checkpoint (with its SD ``config``)."""
    from ldm.models.latent_diffusion import LatentDiffusion

    if config is None and is_our_format(path):
        if use_ema:
            raise ValueError(f"{path}: our own files hold the EMA weights already; --use-ema is for SD checkpoints")
        model = LatentDiffusion.from_checkpoint(path, map_location=map_location)
        if parameterization is not None and parameterization != model.parameterization:
            raise ValueError(f"{path} is a {model.parameterization}-prediction model (its config says so); "
                             f"--parameterization {parameterization} contradicts it")
        return model
    return load_single_file(path, config=config, parameterization=parameterization, use_ema=use_ema,
                            map_location=map_location)


__all__ = ["CheckpointFormatError", "infer_variant", "is_our_format", "load_model", "load_sd_config",
           "load_single_file", "read_state_dict", "sd_config_to_ours", "stock_config_path"]
