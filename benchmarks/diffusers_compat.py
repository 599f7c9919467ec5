"""Our UNet / VAE weights as diffusers models, converted by diffusers' own LDM-checkpoint functions.

Our state dicts use Stable Diffusion's key layout (the UNet's keys are SD's ``model.diffusion_model.*`` without
the prefix, the VAE's are ``first_stage_model.*`` without it), so diffusers' converters for original SD
checkpoints apply unchanged: we put the prefixes back, wrap our configs in an SD-style ``original_config``
(``model.params.unet_config.params``, ``model.params.first_stage_config.params``) and call diffusers'
``create_unet_diffusers_config*``, ``convert_ldm_unet_checkpoint``, ``create_vae_diffusers_config*`` and
``convert_ldm_vae_checkpoint``.

Where those live depends on the diffusers version (see :func:`converters`):
``diffusers.loaders.single_file_utils`` (0.26 and later; needs no ``transformers``), or the older
``diffusers.pipelines.stable_diffusion.convert_from_ckpt`` (importing it needs ``transformers``).

What diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` cannot express is a ``ValueError`` here, not a
silently different model: per-level ``num_res_blocks``, ``resblock_updown``, scale-shift norm, class
conditioning, ``AttentionBlock`` instead of spatial transformers; VAE attention outside the mid block,
``embed_dim != z_channels``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ldm.diffusion.schedules import DEFAULT_BETA_ENDPOINTS
from ldm.util import to_container

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Only read by diffusers' UNet config function for the latent size (sample_size), which we set ourselves.
_PLACEHOLDER_DDCONFIG = {"ch_mult": [1, 2, 4, 4], "ch": 128, "in_channels": 3, "out_ch": 3, "z_channels": 4,
                         "num_res_blocks": 2, "attn_resolutions": []}

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


# ---------------------------------------------------------------------------------------------------- converters


@dataclass(frozen=True)
class Converters:
    """diffusers' conversion functions behind one signature.

    ``unet_config(original_config) -> dict``, ``vae_config(original_config) -> dict``,
    ``convert_unet(prefixed_state_dict, config) -> dict``, ``convert_vae(prefixed_state_dict, config) -> dict``.
    """

    source: str
    unet_config: Callable[[dict], dict]
    vae_config: Callable[[dict], dict]
    convert_unet: Callable[[dict, dict], dict]
    convert_vae: Callable[[dict, dict], dict]


_converters: Optional[Converters] = None


def converters() -> Converters:
    """The installed diffusers' LDM-checkpoint converters (``ImportError`` naming both places when neither imports)."""
    global _converters
    if _converters is not None:
        return _converters
    errors = []
    try:
        from diffusers.loaders import single_file_utils as m

        # image_size=None: the latent size comes from set_image_size({}) (SD v1's 512); we overwrite sample_size.
        _converters = Converters(
            source=m.__name__,
            unet_config=lambda oc: m.create_unet_diffusers_config_from_ldm(oc, {}),
            vae_config=lambda oc: m.create_vae_diffusers_config_from_ldm(oc, {}),
            convert_unet=lambda sd, config: m.convert_ldm_unet_checkpoint(sd, config),
            convert_vae=lambda sd, config: m.convert_ldm_vae_checkpoint(sd, config),
        )
        return _converters
    except (ImportError, AttributeError) as error:
        errors.append(f"diffusers.loaders.single_file_utils: {error}")
    try:
        from diffusers.pipelines.stable_diffusion import convert_from_ckpt as m

        _converters = Converters(
            source=m.__name__,
            unet_config=lambda oc: m.create_unet_diffusers_config(oc, image_size=512),
            vae_config=lambda oc: m.create_vae_diffusers_config(oc, image_size=512),
            convert_unet=lambda sd, config: m.convert_ldm_unet_checkpoint(sd, config),
            convert_vae=lambda sd, config: m.convert_ldm_vae_checkpoint(sd, config),
        )
        return _converters
    except (ImportError, AttributeError) as error:
        errors.append(f"diffusers.pipelines.stable_diffusion.convert_from_ckpt: {error}")
    raise ImportError("diffusers' LDM checkpoint converters are not importable: " + "; ".join(errors))


def _original_config(unet_params: Optional[dict] = None, ddconfig: Optional[dict] = None, embed_dim: int = 4,
                     scale_factor: Optional[float] = None) -> dict:
    """An SD-style ``original_config`` (the layout of ``v1-inference.yaml``) around our config nodes."""
    params: dict[str, Any] = {
        "first_stage_config": {"params": {"ddconfig": dict(ddconfig or _PLACEHOLDER_DDCONFIG), "embed_dim": embed_dim}},
    }
    if unet_params is not None:
        params["unet_config"] = {"params": unet_params}
    if scale_factor is not None:
        params["scale_factor"] = float(scale_factor)
    return {"model": {"params": params}}


def _strict_load(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, assign: bool) -> nn.Module:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what}: the converted weights do not fit the diffusers model built from the converted config; "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    try:
        model.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{what}: {error}") from error
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise ValueError(f"{what}: some tensors were not loaded (still on the meta device)")
    return model


def _build(cls, config: dict, state_dict: Optional[Mapping[str, torch.Tensor]], what: str) -> nn.Module:
    """``cls.from_config(config)``, with ``state_dict`` loaded strictly (built on the meta device: no random init)."""
    if state_dict is None:
        return cls.from_config(config)
    # Cloned, contiguous tensors: the diffusers model never aliases the source module's parameters.
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()}
    with torch.device("meta"):
        model = cls.from_config(config)
    return _strict_load(model, tensors, what, assign=True)


# ---------------------------------------------------------------------------------------------------- UNet


def full_unet_params(unet_params: Mapping[str, Any]) -> dict:
    """Our ``UNetModel`` params with every unset argument at its default (plain Python containers)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    signature = inspect.signature(UNetModel.__init__)
    params = {
        name: p.default for name, p in signature.parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }
    params.update(to_container(dict(unet_params)))
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        raise ValueError(f"unknown UNetModel parameter(s) {unknown}")
    return params


def unet_heads_per_level(unet_params: Mapping[str, Any]) -> list[int]:
    """Attention heads of each level's spatial transformers, as our ``UNetModel`` computes them."""
    p = full_unet_params(unet_params)
    heads = []
    for mult in p["channel_mult"]:
        ch = mult * p["model_channels"]
        heads.append(p["num_heads"] if p["num_head_channels"] == -1 else ch // p["num_head_channels"])
    return heads


def check_unet_params(unet_params: Mapping[str, Any]) -> dict:
    """Full params if diffusers' ``UNet2DConditionModel`` can express this UNet, else ``ValueError`` saying why."""
    p = full_unet_params(unet_params)
    problems = []
    if p["dims"] != 2:
        problems.append(f"dims={p['dims']} (diffusers' UNet2DConditionModel is 2-D)")
    if not p["use_spatial_transformer"]:
        problems.append("use_spatial_transformer=False (AttentionBlock UNets are not UNet2DConditionModel's layout)")
    if not isinstance(p["num_res_blocks"], int):
        problems.append(f"per-level num_res_blocks {p['num_res_blocks']} (the converter needs one int)")
    for name in ("resblock_updown", "use_scale_shift_norm", "disable_middle_self_attn"):
        if p[name]:
            problems.append(f"{name}=True")
    for name in ("num_classes", "num_attention_blocks", "n_embed", "disable_self_attentions"):
        if p[name] is not None:
            problems.append(f"{name}={p[name]!r}")
    if not p["conv_resample"]:
        problems.append("conv_resample=False")
    context = p["context_dim"]
    if isinstance(context, (list, tuple)) and len(set(context)) != 1:
        problems.append(f"per-block context_dim {context}")
    if problems:
        raise ValueError("this UNet cannot be converted to diffusers' UNet2DConditionModel: " + "; ".join(problems))
    return p


def diffusers_unet_config(unet_params: Mapping[str, Any], sample_size: Optional[int] = None) -> dict:
    """diffusers ``UNet2DConditionModel`` config from our ``UNetModel`` params, via diffusers' own function.

    ``sample_size``: the latent size (default our ``image_size``). Where diffusers' config function derives the
    wrong number of heads (it reads ``num_heads``, or ``num_head_channels`` only with linear projections), the
    per-level head counts of our model are set instead (``attention_head_dim`` means heads in diffusers' UNet).
    """
    p = check_unet_params(unet_params)
    # SD configs carry only the keys that are set: the converter tests ``"num_heads" in params``.
    sd_params = {k: v for k, v in p.items() if v is not None or k == "context_dim"}
    for key in ("num_heads", "num_head_channels"):
        if sd_params.get(key) == -1:
            del sd_params[key]
    config = dict(converters().unet_config(_original_config(unet_params=sd_params)))
    heads = unet_heads_per_level(p)
    derived = config.get("attention_head_dim")
    derived = list(derived) if isinstance(derived, (list, tuple)) else [derived] * len(heads)
    if derived != heads:
        logger.info("diffusers' config function gave attention_head_dim=%s; using our heads per level %s", derived, heads)
        config["attention_head_dim"] = heads if len(set(heads)) > 1 else heads[0]
    config["sample_size"] = int(sample_size if sample_size is not None else p["image_size"])
    return config


def convert_unet_state_dict(state_dict: Mapping[str, torch.Tensor], config: dict) -> dict:
    """Our UNet state dict (SD keys without ``model.diffusion_model.``) -> diffusers keys, by diffusers' converter."""
    prefixed = {UNET_PREFIX + k: v for k, v in state_dict.items()}
    return converters().convert_unet(prefixed, config)


def to_diffusers_unet(unet_params: Mapping[str, Any], state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                      sample_size: Optional[int] = None) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` with our weights (random init when ``state_dict`` is None), in eval mode."""
    from diffusers import UNet2DConditionModel

    config = diffusers_unet_config(unet_params, sample_size)
    converted = None if state_dict is None else convert_unet_state_dict(state_dict, config)
    return _build(UNet2DConditionModel, config, converted, "UNet conversion").eval()


# ---------------------------------------------------------------------------------------------------- VAE


def check_vae_config(ddconfig: Mapping[str, Any], embed_dim: int) -> dict:
    """Plain ddconfig if diffusers' ``AutoencoderKL`` can express this VAE, else ``ValueError`` saying why."""
    d = dict(to_container(dict(ddconfig)))
    problems = []
    if list(d.get("attn_resolutions", [])):
        problems.append(f"attn_resolutions={list(d['attn_resolutions'])} (diffusers' converted VAE has attention "
                        "in the mid blocks only)")
    if int(embed_dim) != int(d["z_channels"]):
        problems.append(f"embed_dim={embed_dim} != z_channels={d['z_channels']} (diffusers' quant convs keep the width)")
    if d.get("attn_type", "vanilla") not in ("vanilla", "vanilla-xformers"):
        problems.append(f"attn_type={d['attn_type']!r}")
    for name in ("give_pre_end", "tanh_out", "use_linear_attn"):
        if d.get(name, False):
            problems.append(f"{name}=True")
    if not d.get("resamp_with_conv", True):
        problems.append("resamp_with_conv=False")
    if problems:
        raise ValueError("this VAE cannot be converted to diffusers' AutoencoderKL: " + "; ".join(problems))
    return d


def diffusers_vae_config(ddconfig: Mapping[str, Any], embed_dim: int, scale_factor: Optional[float] = None) -> dict:
    """diffusers ``AutoencoderKL`` config from our ``ddconfig`` / ``embed_dim``, via diffusers' own function."""
    d = check_vae_config(ddconfig, embed_dim)
    config = dict(converters().vae_config(_original_config(ddconfig=d, embed_dim=int(embed_dim), scale_factor=scale_factor)))
    config["sample_size"] = int(d["resolution"])
    if scale_factor is not None:
        config["scaling_factor"] = float(scale_factor)
    return config


def convert_vae_state_dict(state_dict: Mapping[str, torch.Tensor], config: dict) -> dict:
    """Our VAE state dict (SD keys without ``first_stage_model.``) -> diffusers keys, by diffusers' converter."""
    prefixed = {VAE_PREFIX + k: v for k, v in state_dict.items()}
    return converters().convert_vae(prefixed, config)


def to_diffusers_vae(ddconfig: Mapping[str, Any], embed_dim: int,
                     state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                     scale_factor: Optional[float] = None) -> nn.Module:
    """A diffusers ``AutoencoderKL`` with our weights (random init when ``state_dict`` is None), in eval mode."""
    from diffusers import AutoencoderKL

    config = diffusers_vae_config(ddconfig, embed_dim, scale_factor)
    converted = None if state_dict is None else convert_vae_state_dict(state_dict, config)
    return _build(AutoencoderKL, config, converted, "VAE conversion").eval()


# ---------------------------------------------------------------------------------------------------- scheduler


DIFFUSERS_BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}


def diffusers_ddim_scheduler(schedule_params: Mapping[str, Any], parameterization: str = "eps",
                             timestep_spacing: str = "leading"):
    """diffusers ``DDIMScheduler`` set up like our ``DDIMSampler`` (defaults: Stable Diffusion's DDIM).

    ``leading`` spacing with ``steps_offset=1`` (981, 961, ..., 1 for 50 of 1000) or ``trailing`` (999, 979,
    ..., 19), last step to ``alphas_cumprod[0]`` (``set_alpha_to_one=False``), no clipping. ``schedule_params``
    are our ``ldm.diffusion.NoiseSchedule`` params; non-rescaled ``scaled_linear``, ``linear`` and ``cosine``
    (diffusers' ``squaredcos_cap_v2``: the same improved-DDPM formula, cap 0.999) schedules map.
    """
    from diffusers import DDIMScheduler

    s = dict(to_container(dict(schedule_params)))
    kind = s.get("kind", "scaled_linear")
    if kind not in DIFFUSERS_BETA_SCHEDULES or s.get("rescale_zero_terminal_snr") or s.get("betas") is not None:
        raise ValueError(f"no diffusers DDIMScheduler equivalent set up here for schedule {s}")
    if parameterization not in PREDICTION_TYPES:
        raise ValueError(f"parameterization must be one of {sorted(PREDICTION_TYPES)}, got {parameterization!r}")
    if timestep_spacing not in ("leading", "trailing"):
        raise ValueError(f"timestep_spacing must be 'leading' or 'trailing', got {timestep_spacing!r}")
    endpoints = {}
    if kind != "cosine":  # cosine is defined by alpha_bar alone
        default_start, default_end = DEFAULT_BETA_ENDPOINTS[kind]
        beta_start = s.get("beta_start") if s.get("beta_start") is not None else default_start
        beta_end = s.get("beta_end") if s.get("beta_end") is not None else default_end
        endpoints = {"beta_start": float(beta_start), "beta_end": float(beta_end)}
    return DDIMScheduler(
        num_train_timesteps=int(s.get("num_timesteps", 1000)),
        beta_schedule=DIFFUSERS_BETA_SCHEDULES[kind],
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1 if timestep_spacing == "leading" else 0,
        timestep_spacing=timestep_spacing,
        prediction_type=PREDICTION_TYPES[parameterization],
        **endpoints,
    )


# ---------------------------------------------------------------------------------------------------- weights


@torch.no_grad()
def perturb_parameters(module: nn.Module, generator: Optional[torch.Generator] = None, scale: float = 0.5,
                       vector_std: float = 0.02) -> nn.Module:
    """Add Gaussian noise to every parameter in place, so that zero-initialised layers become non-trivial.

    Weights (ndim >= 2) get ``N(0, (scale / sqrt(fan_in))^2)`` (keeps activations O(1) whatever the width);
    biases and norm scales get ``N(0, vector_std^2)``. Returns ``module``.
    """
    for p in module.parameters():
        if p.ndim >= 2:
            std = scale / max(1, p[0].numel()) ** 0.5
        else:
            std = vector_std
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32, device="cpu")
        p.add_(noise.to(device=p.device, dtype=p.dtype), alpha=std)
    return module


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float64 (shapes must match)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.detach().double() - b.detach().double()).abs().max())
