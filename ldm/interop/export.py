"""Our models out, in the formats others load: Stable Diffusion's single file (+ its original-format YAML), a
diffusers folder (:mod:`ldm.interop.diffusers`, needs the ``diffusers`` extra) and ours.

An SD single file is our state dict (the key layout is SD's already) plus the schedule tables SD's ``DDPM``
registers as buffers, computed from our schedule in float32 as SD stores them, so SD's own code loads it with
``strict=True``. The YAML beside it is :func:`ldm.interop.sd_config.ours_to_sd_config` of the model's config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors.torch import save_file

from ldm.checkpoint import atomic_write
from ldm.interop.sd_config import ours_to_sd_config
from ldm.interop.single_file import sd_schedule_tables

FORMATS = ("sd", "ours", "diffusers")


def sd_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights in SD's layout with SD's schedule buffers (``dtype`` casts the floating weights)."""
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous()
    state.update({name: table.float() for name, table in sd_schedule_tables(model.schedule).items()})
    return state


def save_sd(model, path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """Write ``path`` (SD single file, ``.safetensors``) and the matching original-format YAML beside it
    (``<stem>.yaml``); returns both paths."""
    if model.config is None:
        raise ValueError("this model was built without a config; build it with LatentDiffusion.from_config")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--out {path}: write an SD file as .safetensors (no pickles)")
    sd_config = ours_to_sd_config(model.config)
    state = sd_state_dict(model, dtype)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    yaml_path = path.with_suffix(".yaml")
    text = ("# Stable Diffusion's original inference config for " + path.name + " (written by ldm.interop.export)\n"
            + yaml.safe_dump(sd_config, sort_keys=False))
    atomic_write(yaml_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return str(path), str(yaml_path)


def convert_checkpoint(
    source: str | os.PathLike,
    to: str,
    out: str | os.PathLike,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    parameterization: str | None = None,
    use_ema: bool | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Convert ``source`` (our file, an original SD file with its SD ``config``, or a diffusers folder) to ``to``
    (``sd``, ``ours`` or ``diffusers``: a new folder ``out``); returns the written paths."""
    from ldm.interop import load_model

    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    if to == "diffusers":  # before loading anything: a missing extra is the first thing to say
        from ldm.interop.diffusers import require_diffusers

        require_diffusers("--to diffusers")
    model = load_model(source, config=config, parameterization=parameterization, use_ema=use_ema)
    if to == "sd":
        return list(save_sd(model, out, dtype))
    if to == "diffusers":
        from ldm.interop.diffusers import save_diffusers

        return save_diffusers(model, out, dtype)
    if Path(out).suffix != ".safetensors":
        raise ValueError(f"--out {out}: our format is a .safetensors file")
    model.save(out, dtype=dtype)
    return [os.fspath(out)]
