"""Autoencoder weights on disk: ``.safetensors`` with the model config and the latent scale factor in the metadata.

Metadata keys written by ``save_autoencoder``:
``config`` (JSON ``{target: autoencoder.AutoencoderKL, params: {ddconfig, embed_dim}}``),
``scale_factor`` (``1 / std`` of the latents, see ``autoencoder.scale``), optional ``latent_mean``/``latent_std``
and anything else the caller adds (the training script stores ``data_config``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoint import (
    atomic_write,
    load_config_from_checkpoint,
    load_into,
    load_state_dict,
    read_safetensors_metadata,
    save_safetensors,
)
from ldm.util import instantiate_from_config

FIRST_STAGE_PREFIX = "first_stage_model."
# parts of a CompVis/SD autoencoder checkpoint that are not the AutoencoderKL module
_TRAINING_ONLY_PREFIXES = ("loss.", "model_ema.")


def extract_first_stage_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The AutoencoderKL weights inside a checkpoint's state dict.

    A full Stable Diffusion checkpoint keeps them under ``first_stage_model.`` (the prefix is stripped);
    a CompVis autoencoder checkpoint also holds ``loss.*`` (LPIPS, discriminator) and ``model_ema.*`` entries,
    which are dropped.
    """
    if any(k.startswith(FIRST_STAGE_PREFIX) for k in state_dict):
        state_dict = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(FIRST_STAGE_PREFIX)}
    return {k: v for k, v in state_dict.items() if not k.startswith(_TRAINING_ONLY_PREFIXES)}


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike, ignore_keys: Iterable[str] = ()) -> None:
    """Strictly load an autoencoder checkpoint (``.safetensors``, SD ``.ckpt``, CompVis ``.ckpt``) into ``model``."""
    state_dict = extract_first_stage_state_dict(load_state_dict(path))
    ignore_keys = tuple(ignore_keys)
    if ignore_keys:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ignore_keys)}
    load_into(model, state_dict, what=f"AutoencoderKL ({os.fspath(path)})")


def save_autoencoder(
    path: str | os.PathLike,
    model,
    scale_factor: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Atomically write ``model.state_dict()`` with its config (and ``scale_factor`` when given) in the metadata."""
    meta = dict(metadata or {})
    if scale_factor is not None:
        meta["scale_factor"] = _format_scale(scale_factor)
    save_safetensors(path, model.state_dict(), config=model.model_config(), metadata=meta, dtype=dtype)


def _format_scale(scale_factor: float) -> str:
    scale_factor = float(scale_factor)
    if not math.isfinite(scale_factor) or scale_factor <= 0:
        raise ValueError(f"scale_factor must be a positive finite number, got {scale_factor}")
    return repr(scale_factor)


def read_scale_factor(path: str | os.PathLike) -> float | None:
    """The ``scale_factor`` stored in a weights file's metadata, or ``None`` when it has none."""
    meta = read_safetensors_metadata(path)
    if "scale_factor" not in meta:
        return None
    try:
        return float(meta["scale_factor"])
    except ValueError as error:
        raise ValueError(f"{path}: metadata scale_factor is not a number: {meta['scale_factor']!r}") from error


def update_metadata(path: str | os.PathLike, updates: Mapping[str, Any]) -> None:
    """Rewrite a ``.safetensors`` file atomically with ``updates`` merged into its metadata (tensors unchanged)."""
    path = os.fspath(path)
    meta = read_safetensors_metadata(path)
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in updates.items()})
    tensors = load_file(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def write_scale_factor(path: str | os.PathLike, scale_factor: float, **extra: float) -> None:
    """Store ``scale_factor`` (and e.g. ``latent_mean``/``latent_std``) in the file's metadata, atomically."""
    updates = {"scale_factor": _format_scale(scale_factor)}
    updates.update({k: repr(float(v)) for k, v in extra.items()})
    update_metadata(path, updates)


def load_autoencoder(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", require_scale_factor: bool = True
):
    """Rebuild an ``AutoencoderKL`` from a ``.safetensors`` file written by ``save_autoencoder``.

    Returns ``(model, scale_factor)``; the model is in eval mode. The architecture comes from the ``config``
    metadata and the weights load strictly (a mismatch lists the missing/unexpected keys). Without a stored
    ``scale_factor`` this raises ``ValueError`` (run ``scripts/compute_scale_factor.py``) unless
    ``require_scale_factor=False``, in which case ``None`` is returned for it.
    """
    from autoencoder.autoencoder_kl import AutoencoderKL

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"autoencoder weights not found: {path}")
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: load_autoencoder reads .safetensors files written by save_autoencoder")
    config = load_config_from_checkpoint(path)
    try:
        model = instantiate_from_config(config, path=f"{path}:metadata.config")
    except (TypeError, KeyError) as error:
        raise ValueError(f"{path}: the stored config cannot build an autoencoder ({error})") from error
    if not isinstance(model, AutoencoderKL):
        raise ValueError(f"{path}: the stored config builds {type(model).__name__}, not an AutoencoderKL")
    load_into(model, load_state_dict(path, map_location=map_location), what=f"AutoencoderKL ({path})")
    model.to(map_location).eval()
    scale_factor = read_scale_factor(path)
    if scale_factor is None and require_scale_factor:
        raise ValueError(
            f"{path}: no 'scale_factor' in the metadata; compute it with "
            f"`python scripts/compute_scale_factor.py --ckpt {path}`"
        )
    return model, scale_factor


def read_data_config(path: str | os.PathLike) -> dict | None:
    """The ``data_config`` the training script stored with the weights (``None`` when absent)."""
    if "data_config" not in read_safetensors_metadata(path):
        return None
    return load_config_from_checkpoint(path, key="data_config")
