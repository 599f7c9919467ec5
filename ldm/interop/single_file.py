"""Original Stable Diffusion single files (``.ckpt`` / ``.safetensors``) into a :class:`LatentDiffusion`.

Our module names are SD's (``model.diffusion_model``, ``first_stage_model``, ``cond_stage_model``), so an SD state
dict loads into our model key for key once the parts SD keeps beside the weights are dealt with:

* the schedule tables SD registers as buffers (``betas``, ``alphas_cumprod``, ``posterior_*`` ...) are compared with
  our schedule's (a mismatch is an error naming the table: the file was trained with another schedule), then dropped;
* ``model_ema.*`` (SD's LitEma: ``model_ema.diffusion_modelinput_blocks00weight``) replaces the UNet weights with
  ``use_ema=True``, and is dropped otherwise; ``model_ema.decay``/``num_updates``, ``logvar`` and the
  ``scale_factor`` buffer of a ``scale_by_std`` run are read or dropped;
* everything else must match exactly: every weight consumed, none missing, shapes equal. A wrong file gets one
  error naming the first keys and shapes that differ.

Loading is cheap: the model is built without random initialisation (:func:`skip_weight_init`) and a safetensors
file's tensors are memory-mapped copy-on-write and become the parameters (``assign``), so pages are read as the
weights are first used and writes never reach the file (``benchmarks/sd_load.py``: a full-size SD 2 file loads in
2-9 s with 1.2 GiB resident, against 17-22 s and 6.5 GiB for diffusers' UNet + VAE).

The file is read by content, not by extension (:func:`ldm.checkpoint.load_state_dict`): a safetensors header or a
zip/pickle ``torch.save`` archive, the latter only with ``torch.load(weights_only=True)``. Without a config the variant is read off the weights
(:func:`infer_variant`) and SD's stock inference config for it is used (``configs/stable-diffusion/``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Mapping

import torch

from ldm.checkpoint import CheckpointFormatError, load_state_dict
from ldm.interop.sd_config import load_sd_config, sd_config_to_ours, stock_config_path

log = logging.getLogger(__name__)

# SD's DDPM.register_schedule buffers: name -> how to compute it from betas (float64), to compare with the file
_SCHEDULE_TABLES = {
    "betas": lambda b, a, ap: b,
    "alphas_cumprod": lambda b, a, ap: a,
    "alphas_cumprod_prev": lambda b, a, ap: ap,
    "sqrt_alphas_cumprod": lambda b, a, ap: a.sqrt(),
    "sqrt_one_minus_alphas_cumprod": lambda b, a, ap: (1 - a).sqrt(),
    "log_one_minus_alphas_cumprod": lambda b, a, ap: (1 - a).log(),
    "sqrt_recip_alphas_cumprod": lambda b, a, ap: (1 / a).sqrt(),
    "sqrt_recipm1_alphas_cumprod": lambda b, a, ap: (1 / a - 1).sqrt(),
    "posterior_variance": lambda b, a, ap: b * (1 - ap) / (1 - a),
    "posterior_log_variance_clipped": lambda b, a, ap: (b * (1 - ap) / (1 - a)).clamp(min=1e-20).log(),
    "posterior_mean_coef1": lambda b, a, ap: b * ap.sqrt() / (1 - a),
    "posterior_mean_coef2": lambda b, a, ap: (1 - ap) * (1 - b).sqrt() / (1 - a),
}
_DROPPED = ("logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates")
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."


# --------------------------------------------------------------------------------------------- variants


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The stock config a file fits, read off its weights as diffusers' ``from_single_file`` does: the text
    encoder's layout (HF CLIP -> v1, OpenCLIP -> v2) and the UNet's input channels (9 -> inpainting).

    v-prediction cannot be seen in the weights: v2 files are taken as eps unless ``parameterization="v"`` is given.
    """
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        first = sorted(state_dict)[:5]
        raise CheckpointFormatError(
            f"no UNet in this file ({UNET_PREFIX}input_blocks.0.0.weight missing; first keys {first}): a VAE-only, "
            "LoRA or text-encoder file is not a whole Stable Diffusion checkpoint")
    if any(k.startswith("cond_stage_model.transformer.") for k in state_dict):
        family = "v1"
    elif any(k.startswith("cond_stage_model.model.") for k in state_dict):
        family = "v2"
    else:
        raise CheckpointFormatError("no text encoder in this file (cond_stage_model.transformer.* for SD v1 or "
                                    "cond_stage_model.model.* for SD v2): pass --config for such a file")
    inpainting = conv_in.shape[1] == 9
    return f"{family}-inpainting-inference" if inpainting else f"{family}-inference"


# --------------------------------------------------------------------------------------------- state dict


def sd_schedule_tables(schedule) -> dict[str, torch.Tensor]:
    """SD's ``register_schedule`` buffers for ``schedule``, float64 (SD stores them in float32)."""
    betas = schedule.betas.double().cpu()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return {name: fn(betas, alphas_cumprod, previous) for name, fn in _SCHEDULE_TABLES.items()}


def check_schedule_tables(state_dict: Mapping[str, torch.Tensor], schedule, source: str) -> list[str]:
    """Compare SD's schedule buffers in the file with ``schedule``'s (relative 1e-4: SD stores them in float32);
    an error names the first that differs. Returns the table names found."""
    found = []
    for name, expected in sd_schedule_tables(schedule).items():
        if name not in state_dict:
            continue
        stored = state_dict[name].double()
        if stored.shape != expected.shape:
            raise CheckpointFormatError(f"{source}: schedule table {name!r} has {stored.numel()} steps, the config "
                                        f"{expected.numel()}: the file was trained with another schedule")
        finite = torch.isfinite(expected)
        if not torch.allclose(stored[finite], expected[finite], rtol=1e-4, atol=1e-7):
            index = int(((stored - expected).abs() / expected.abs().clamp(min=1e-12)).nan_to_num(0).argmax())
            raise CheckpointFormatError(
                f"{source}: schedule table {name!r} differs from the config's schedule (step {index}: file "
                f"{float(stored[index]):.6g}, config {float(expected[index]):.6g}): the file was trained with another "
                "beta schedule (check linear_start/linear_end/timesteps in --config)")
        found.append(name)
    return found


def ema_key(unet_key: str) -> str:
    """SD's LitEma buffer name of a ``model.diffusion_model.*`` weight: the path under ``model``, dots removed."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


class _Selection(Mapping):
    """The weights to load, as names into the file: ``{model key: file key}`` read lazily from ``source``."""

    def __init__(self, source: Mapping[str, torch.Tensor], names: dict[str, str]):
        self.source, self.names = source, names

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source[self.names[key]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, key: str) -> tuple[int, ...]:
        return _shape(self.source, self.names[key])

    def release(self) -> None:
        getattr(self.source, "release", lambda: None)()


def select_weights(state_dict: Mapping[str, torch.Tensor], use_ema: bool | None, source: str,
                   unet_keys: list[str]) -> tuple[Mapping, bool]:
    """The UNet/VAE/text weights to load: SD's schedule tables and bookkeeping left out, ``model_ema.*`` in place of
    the UNet weights (``unet_keys``, the model's) when ``use_ema``, and dropped otherwise. ``use_ema=None``: EMA only
    when the file keeps its UNet as EMA weights alone. Nothing is read from the file here."""
    names = {k: k for k in state_dict
             if not k.startswith(EMA_PREFIX) and k not in _SCHEDULE_TABLES and k not in _DROPPED
             and k != "scale_factor" and not k.endswith("embeddings.position_ids")}  # HF's index table, no weight
    ema = {k for k in state_dict if k.startswith(EMA_PREFIX) and k not in _DROPPED}
    if use_ema is None:
        use_ema = bool(ema) and not any(k.startswith(UNET_PREFIX) for k in names)
    if use_ema:
        if not ema:
            raise CheckpointFormatError(f"{source}: --use-ema was asked for but the file holds no model_ema.* weights")
        missing = [k for k in unet_keys if ema_key(k) not in ema]
        if missing:
            raise CheckpointFormatError(f"{source}: model_ema.* lacks {len(missing)} UNet weight(s), e.g. "
                                        f"{ema_key(missing[0])}")
        names.update({k: ema_key(k) for k in unet_keys})
    return _Selection(state_dict, names), bool(use_ema)


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    shape = getattr(state_dict, "shape", None)
    return shape(key) if callable(shape) else tuple(state_dict[key].shape)


def _head(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def skip_weight_init():
    """Build modules without drawing their random initial weights (``torch.nn.init`` functions do nothing inside):
    every weight is about to be overwritten by the checkpoint, and initialising a 1.3 B-parameter model costs more
    than reading it. Buffers computed in ``__init__`` (schedule tables, attention masks) are unaffected."""
    originals = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    try:
        for name in originals:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.nn.init, name, fn)


def _chunk(key: str) -> str:
    """The submodule loaded at once: the text encoder whole (its load hooks may need all of it), else the module
    the key belongs to, at most 4 levels down (a UNet block, an encoder level)."""
    if key.startswith("cond_stage_model."):
        return "cond_stage_model"
    return ".".join(key.split(".")[:-1][:4])


def load_sd_weights(model, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load SD-layout weights into ``model``; one error naming the first keys and shapes that differ.

    After the whole key set is checked, weights are copied in chunks (a UNet block, an encoder level, ...), so a
    lazily read file (:class:`ldm.checkpoint.LazyStateDict`) never holds more than one chunk in memory beside the model."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k} (file {_shape(state_dict, k)}, config {tuple(own[k].shape)})"
                  for k in sorted(set(own) & set(state_dict)) if _shape(state_dict, k) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape(s) differ: {_head(mismatched, 3)}")
        if missing:
            parts.append(f"{len(missing)} weight(s) missing from the file: {_head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} weight(s) the config has no place for: {_head(unexpected)}")
        raise CheckpointFormatError(f"{source} does not fit its config (another variant or size? a LoRA?): "
                                    + "; ".join(parts))
    chunks: dict[str, list[str]] = {}
    for key in own:
        chunks.setdefault(_chunk(key), []).append(key)
    with torch.no_grad():
        for prefix, keys in chunks.items():
            # into the submodule itself: load_state_dict walks every module below the one it is called on
            part = model.get_submodule(prefix) if prefix else model
            start = len(prefix) + 1 if prefix else 0
            # assign: the tensors just read become the parameters (no second copy; the empty ones built under
            # skip_weight_init were never touched, so they never took memory)
            result = part.load_state_dict({k[start:]: state_dict[k].to(own[k].dtype) for k in keys}, strict=False,
                                          assign=True)
            if result.unexpected_keys:  # cannot happen after the check above, unless a module renames its keys
                raise CheckpointFormatError(f"{source}: {prefix} did not take {result.unexpected_keys[:3]}")
            getattr(state_dict, "release", lambda: None)()


# --------------------------------------------------------------------------------------------- the whole model


def load_single_file(
    path: str | os.PathLike,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    parameterization: str | None = None,
    use_ema: bool | None = None,
    map_location: str | torch.device = "cpu",
):
    """A :class:`LatentDiffusion` from an original Stable Diffusion checkpoint.

    Args:
        path: SD ``.ckpt`` / ``.safetensors`` (read by content).
        config: SD's original inference YAML (path or mapping), e.g. ``v2-inference-v.yaml``; ``None``: the stock
            config of the variant read off the weights (:func:`infer_variant`).
        parameterization: ``eps``/``v``/``x0``, overriding the config (a v-prediction file without a config needs it).
        use_ema: load ``model_ema.*`` into the UNet (default: only when the file has no other UNet weights).
    """
    from ldm.models.latent_diffusion import LatentDiffusion

    source = os.fspath(path)
    state_dict = load_state_dict(source, lazy=True)
    if config is None:
        variant = infer_variant(state_dict)
        ours = load_sd_config(stock_config_path(variant))
        log.info("%s: no --config given; the weights look like %s (stock config %s)", source, variant,
                 stock_config_path(variant))
        if parameterization is None and variant.startswith("v2"):
            log.warning("%s: eps-prediction assumed; v-prediction cannot be read off the weights, so a 768-v model "
                        "needs --parameterization v (or --config v2-inference-v.yaml)", source)
    elif isinstance(config, Mapping):
        ours = sd_config_to_ours(config)
    else:
        ours = load_sd_config(config)
    if parameterization is not None:
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be eps, x0 or v, got {parameterization!r}")
        ours["parameterization"] = parameterization
    if ours.pop("variant") == "inpainting":
        ours["inpainting"] = True
    if "scale_factor" in state_dict:  # a scale_by_std run stores the factor it measured
        ours["scale_factor"] = float(state_dict["scale_factor"])
    if not math.isfinite(ours["scale_factor"]) or ours["scale_factor"] <= 0:
        raise CheckpointFormatError(f"{source}: scale_factor {ours['scale_factor']} is not a positive number")
    ours.setdefault("sampler_defaults", {})

    with skip_weight_init():
        model = LatentDiffusion.from_config(ours)
    check_schedule_tables(state_dict, model.schedule, source)
    unet_keys = [k for k in model.state_dict() if k.startswith(UNET_PREFIX)]
    weights, used_ema = select_weights(state_dict, use_ema, source, unet_keys)
    load_sd_weights(model, weights, source)
    log.info("loaded %s (%s, %s-prediction%s)", source, "inpainting" if ours.get("inpainting") else "txt2img",
             model.parameterization, ", EMA weights" if used_ema else "")
    return model.to(map_location).eval()
