"""Our models as diffusers folders (``StableDiffusionPipeline.from_pretrained(DIR)``), and diffusers folders back.

Out (:func:`save_diffusers`): our state dict is Stable Diffusion's layout, so diffusers' own converters for original
SD checkpoints make the parts:

* ``unet/``: ``create_unet_diffusers_config_from_ldm`` + ``convert_ldm_unet_checkpoint``;
* ``vae/``: ``create_vae_diffusers_config_from_ldm`` + ``convert_ldm_vae_checkpoint`` (``scaling_factor`` = our
  ``scale_factor``);
* ``text_encoder/``: a transformers ``CLIPTextModel`` of the tower's size (``hidden_act`` ``quick_gelu`` for OpenAI
  CLIP / quick-GELU towers, ``gelu`` otherwise), weights by ``convert_open_clip_checkpoint`` (SD 2's
  ``FrozenOpenCLIPEmbedder``) or ``convert_ldm_clip_checkpoint`` (SD 1's ``FrozenCLIPEmbedder``, HF layout already).
  A ``layer="penultimate"`` tower is exported as diffusers does for SD 2: one block fewer
  (``num_hidden_layers = layers - 1``), its output through ``final_layer_norm``; that is exactly our
  penultimate encoding, with no ``clip_skip`` needed;
* ``tokenizer/``: ``CLIPTokenizer`` files written offline from open_clip's bundled BPE
  (:func:`write_clip_tokenizer_files`), padding as ours: ``<|endoftext|>`` for ``FrozenCLIPEmbedder`` (SD 1), ``!``
  (id 0, open_clip's padding) for ``FrozenOpenCLIPEmbedder`` (SD 2); ``split_special_tokens`` so that a ``!`` in a
  prompt stays the BPE token open_clip makes of it instead of matching the pad token;
* ``scheduler/``: a ``DDIMScheduler`` equal to our schedule (``scaled_linear``, ``linear``, ``cosine`` =
  ``squaredcos_cap_v2``, explicit betas = ``trained_betas``, zero terminal SNR = ``rescale_betas_zero_snr``),
  ``prediction_type`` from our parameterization, and our DDIM defaults including the model's
  ``sampler_defaults["ddim"]`` (``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ``clip_denoised``);
* ``model_index.json`` (written by diffusers' ``save_pretrained``: no safety checker / feature extractor,
  ``requires_safety_checker`` false).

Two files of ours ride along, which diffusers ignores:

* ``ldm_config.json``: our full model config (schedule, parameterization, ``sampler_defaults`` of every sampler,
  module options diffusers has no field for), so that ours -> diffusers -> ours gives the same config;
* ``text_encoder/ldm_extra.safetensors``: the text-tower tensors a ``CLIPTextModel`` has no place for, under our
  (SD) key names: a penultimate tower's last block (SD 2 exports drop it), open_clip's ``text_projection`` and
  ``logit_scale``. Our encoding never uses them, but with them the round trip is bit-equal and an SD file written
  from the folder again has SD 2's exact layout.

In (:func:`load_diffusers`): diffusers has no diffusers -> original converter, so the inverse is derived from its own
forward converters: a state dict of float64 tensors whose every element is a distinct integer (its position in the
whole state dict) goes through the converter, and where each element lands is read off the output
(:func:`inverse_plan`). The converters only rename, slice and reshape, so the inverse is a gather: exact, bit for bit.
The config comes from the folder's configs; for each part, the one in ``ldm_config.json`` is used when it converts to
exactly the folder's diffusers config of that part (so a folder whose scheduler was swapped gets that scheduler's
schedule), else it is derived from the folder (a diffusers folder not written here: SD 1.x/2.x as published).

diffusers and transformers are the optional extra ``pip install -e ".[diffusers]"``; they are imported lazily, and
the core package never needs them.
"""

from __future__ import annotations

import gzip
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ldm.util import to_container

logger = logging.getLogger(__name__)

EXTRA_HINT = 'pip install -e ".[diffusers]"'
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
OPENCLIP_PREFIX = TEXT_PREFIX + "model."
HF_CLIP_PREFIX = TEXT_PREFIX + "transformer.text_model."
LDM_CONFIG_FILE = "ldm_config.json"
TEXT_EXTRA_FILE = "ldm_extra.safetensors"
OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
# open_clip tensors our text encoding never reads (CLIP's contrastive head)
UNUSED_TEXT_TENSORS = ("text_projection", "logit_scale", "logit_bias")

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
DIFFUSERS_BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}

# Only read by diffusers' UNet config function for the latent size (sample_size), which we set ourselves.
_PLACEHOLDER_DDCONFIG = {"ch_mult": [1, 2, 4, 4], "ch": 128, "in_channels": 3, "out_ch": 3, "z_channels": 4,
                         "num_res_blocks": 2, "attn_resolutions": []}


class MissingExtraError(ImportError):
    """diffusers / transformers (the ``diffusers`` extra) are not installed."""


def require_diffusers(what: str = "diffusers interop"):
    """``(diffusers, transformers)``, or :class:`MissingExtraError` telling how to install the extra."""
    try:
        import diffusers
        import transformers
    except ImportError as error:
        raise MissingExtraError(
            f"{what} needs the optional packages diffusers and transformers ({error}); install them with "
            f"{EXTRA_HINT}") from error
    return diffusers, transformers


# ================================================================================================ converters


@dataclass(frozen=True)
class Converters:
    """diffusers' conversion functions behind one signature.

    ``unet_config(original_config) -> dict``, ``vae_config(original_config) -> dict``,
    ``convert_unet(prefixed_state_dict, config) -> dict``, ``convert_vae(prefixed_state_dict, config) -> dict``,
    ``convert_open_clip(text_model, prefixed_state_dict, prefix) -> dict``, ``convert_clip(prefixed_state_dict)
    -> dict`` (both CLIP ones give ``text_model.*`` keys).
    """

    source: str
    unet_config: Callable[[dict], dict]
    vae_config: Callable[[dict], dict]
    convert_unet: Callable[[dict, dict], dict]
    convert_vae: Callable[[dict, dict], dict]
    convert_open_clip: Optional[Callable[..., dict]] = None
    convert_clip: Optional[Callable[[dict], dict]] = None


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
            convert_open_clip=getattr(m, "convert_open_clip_checkpoint", None),
            convert_clip=getattr(m, "convert_ldm_clip_checkpoint", None),
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
    raise MissingExtraError("diffusers' LDM checkpoint converters are not importable: " + "; ".join(errors)
                            + f" (install the extra: {EXTRA_HINT})")


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


# ------------------------------------------------------------------------------------------------ UNet


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


# ------------------------------------------------------------------------------------------------ VAE


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


# ------------------------------------------------------------------------------------------------ scheduler


def ddim_scheduler_config(schedule_params: Mapping[str, Any], parameterization: str = "eps",
                          ddim_defaults: Optional[Mapping[str, Any]] = None) -> dict:
    """``DDIMScheduler`` config equal to our schedule and our ``DDIMSampler`` with ``ddim_defaults``.

    Schedules: ``scaled_linear``, ``linear``, ``cosine`` (diffusers' ``squaredcos_cap_v2``: the same improved-DDPM
    formula, cap 0.999), explicit ``betas`` (``trained_betas``), ``rescale_zero_terminal_snr``
    (``rescale_betas_zero_snr``; diffusers keeps ``abar_{T-1} = 0`` where we store a tiny positive value).
    ``ddim_defaults``: our ``DDIMSampler`` keywords (``timestep_spacing``, default ``leading``; ``steps_offset``,
    default 1, used by ``leading`` only; ``set_alpha_to_one``; ``clip_denoised``); ``eta`` and ``num_steps`` are
    call arguments in diffusers, not scheduler config. (``StableDiffusionPipeline`` itself resets
    ``steps_offset`` to 1 and ``clip_sample`` to False: :func:`to_diffusers_pipeline` warns when that changes
    ours.) diffusers' DDIM steps from ``t`` to ``t - T // n``, which is
    ours (the next timestep of the list) for ``leading`` spacing, and for ``trailing`` when ``n`` divides ``T``.
    """
    s = dict(to_container(dict(schedule_params)))
    d = dict(to_container(dict(ddim_defaults or {})))
    kind = s.get("kind", "scaled_linear")
    if parameterization not in PREDICTION_TYPES:
        raise ValueError(f"parameterization must be one of {sorted(PREDICTION_TYPES)}, got {parameterization!r}")
    spacing = d.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    config: dict[str, Any] = {"num_train_timesteps": int(s.get("num_timesteps", 1000))}
    if s.get("betas") is not None:
        betas = [float(b) for b in s["betas"]]
        config.update(num_train_timesteps=len(betas), trained_betas=betas, beta_schedule="linear")
    elif kind in DIFFUSERS_BETA_SCHEDULES:
        config["beta_schedule"] = DIFFUSERS_BETA_SCHEDULES[kind]
        if kind != "cosine":  # cosine is defined by alpha_bar alone
            from ldm.diffusion.schedules import DEFAULT_BETA_ENDPOINTS

            default_start, default_end = DEFAULT_BETA_ENDPOINTS[kind]
            config["beta_start"] = float(s["beta_start"] if s.get("beta_start") is not None else default_start)
            config["beta_end"] = float(s["beta_end"] if s.get("beta_end") is not None else default_end)
    else:
        raise ValueError(f"no diffusers DDIMScheduler equivalent for schedule {s}")
    clip = d.get("clip_denoised")
    unknown = sorted(set(d) - {"timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_denoised", "eta",
                               "num_steps", "parameterization"})
    if unknown:
        raise ValueError(f"sampler_defaults['ddim'] {unknown} have no DDIMScheduler equivalent")
    config.update(
        clip_sample=clip is not None,
        clip_sample_range=float(clip) if clip is not None else 1.0,
        set_alpha_to_one=bool(d.get("set_alpha_to_one", False)),
        steps_offset=int(d.get("steps_offset", 1)),  # used by leading spacing only
        timestep_spacing=spacing,
        prediction_type=PREDICTION_TYPES[parameterization],
        rescale_betas_zero_snr=bool(s.get("rescale_zero_terminal_snr", False)),
    )
    return config


def diffusers_ddim_scheduler(schedule_params: Mapping[str, Any], parameterization: str = "eps",
                             timestep_spacing: str = "leading"):
    """diffusers ``DDIMScheduler`` set up like our ``DDIMSampler`` (defaults: Stable Diffusion's DDIM).

    ``leading`` spacing with ``steps_offset=1`` (981, 961, ..., 1 for 50 of 1000) or ``trailing`` (999, 979,
    ..., 19), last step to ``alphas_cumprod[0]`` (``set_alpha_to_one=False``), no clipping. See
    :func:`ddim_scheduler_config`.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(ddim_scheduler_config(schedule_params, parameterization,
                                                           {"timestep_spacing": timestep_spacing}))


# ------------------------------------------------------------------------------------------------ text encoder


def write_clip_tokenizer_files(folder: str | os.PathLike) -> tuple[str, str]:
    """``vocab.json`` and ``merges.txt`` of OpenAI's CLIP BPE (what Hugging Face's ``CLIPTokenizer`` reads), written
    offline from the BPE file open_clip ships; returns both paths.

    The vocabulary is built as OpenAI's tokenizer builds it: 256 byte symbols, the same with ``</w>``, one entry per
    merge, then the two special tokens (Hugging Face spells them ``<|startoftext|>`` / ``<|endoftext|>``): 49408.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_bpe()
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return str(vocab_path), str(merges_path)


_bpe_cache: Optional[tuple[dict, list]] = None


def _clip_bpe() -> tuple[dict, list]:
    global _bpe_cache
    if _bpe_cache is None:
        from open_clip.tokenizer import bytes_to_unicode, default_bpe

        merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
        tokens += [SOT_TOKEN, EOT_TOKEN]
        if len(tokens) != 49408 or len(set(tokens)) != len(tokens):
            raise RuntimeError(f"open_clip's BPE file gave {len(tokens)} tokens, not CLIP's 49408")
        _bpe_cache = ({token: i for i, token in enumerate(tokens)}, merges)
    return _bpe_cache


def _text_node(text_node: Mapping[str, Any]) -> tuple[str, dict, dict]:
    """(target, params, open_clip model_config with the class's defaults) of our text-encoder config node."""
    node = to_container(dict(text_node))
    target = node.get("target")
    if target not in (OPENCLIP_TARGET, CLIP_TARGET):
        raise ValueError(f"text encoder {target!r} cannot be exported to diffusers (FrozenOpenCLIPEmbedder or "
                         "FrozenCLIPEmbedder only)")
    params = dict(node.get("params") or {})
    model_config = params.get("model_config")
    if model_config is None:
        from ldm.interop.sd_config import _open_clip_config

        arch = params.get("arch", "ViT-L-14-quickgelu" if target == CLIP_TARGET else "ViT-H-14")
        model_config = _open_clip_config(arch)
        if model_config is None:
            raise ValueError(f"text encoder arch {arch!r} is not an open_clip architecture")
    model_config = dict(model_config)
    if target == CLIP_TARGET:
        model_config.setdefault("quick_gelu", True)  # as FrozenCLIPEmbedder does
    return target, params, model_config


# open_clip text_cfg fields a CLIPTextModel reproduces at these values only (pooling/projection fields don't matter)
_TEXT_CFG_REQUIRED = {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "act_kwargs": None,
                      "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                      "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "hf_model_name": None,
                      "hf_tokenizer_name": None, "tokenizer_mode": None, "tokenizer_kwargs": None}


def diffusers_text_encoder_config(text_node: Mapping[str, Any]) -> dict:
    """``transformers.CLIPTextConfig`` keywords of our text encoder (a penultimate tower: one layer fewer)."""
    target, params, model_config = _text_node(text_node)
    text_cfg = dict(model_config.get("text_cfg") or {})
    problems = [f"text_cfg.{k}={text_cfg[k]!r}" for k, v in _TEXT_CFG_REQUIRED.items()
                if k in text_cfg and text_cfg[k] != v]
    eps = (text_cfg.get("norm_kwargs") or {}).get("eps", 1e-5)
    if set(text_cfg.get("norm_kwargs") or {}) - {"eps"}:
        problems.append(f"text_cfg.norm_kwargs={text_cfg['norm_kwargs']!r}")
    if problems:
        raise ValueError("this text tower cannot be expressed as transformers' CLIPTextModel: " + "; ".join(problems))
    width = int(text_cfg.get("width", 512))
    layers = int(text_cfg.get("layers", 12))
    skip = 1 if params.get("layer", "last") == "penultimate" else 0
    hidden = float(text_cfg.get("mlp_ratio", 4.0)) * width
    if hidden != int(hidden):
        raise ValueError(f"text_cfg.mlp_ratio {text_cfg['mlp_ratio']} gives a fractional MLP width")
    return {
        "vocab_size": int(text_cfg.get("vocab_size", 49408)),
        "hidden_size": width,
        "intermediate_size": int(hidden),
        "num_hidden_layers": layers - skip,
        "num_attention_heads": int(text_cfg.get("heads", 8)),
        "max_position_embeddings": int(text_cfg.get("context_length", 77)),
        "hidden_act": "quick_gelu" if model_config.get("quick_gelu", False) else "gelu",
        "layer_norm_eps": float(eps),
        "projection_dim": int(model_config.get("embed_dim", width)),
        "bos_token_id": SOT_ID,
        "eos_token_id": EOT_ID,
        "pad_token_id": EOT_ID if target == CLIP_TARGET else 0,
    }


def _dropped_text_prefixes(text_node: Mapping[str, Any]) -> tuple[str, ...]:
    """Our keys of the block a penultimate tower skips (diffusers' SD 2 text encoder has no place for it)."""
    target, params, model_config = _text_node(text_node)
    if params.get("layer", "last") != "penultimate":
        return ()
    last = int((model_config.get("text_cfg") or {}).get("layers", 12)) - 1
    if target == CLIP_TARGET:
        return (f"{HF_CLIP_PREFIX}encoder.layers.{last}.",)
    return (f"{OPENCLIP_PREFIX}transformer.resblocks.{last}.",)


def convert_text_state_dict(text_node: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                            flat: bool = True) -> tuple[dict, dict]:
    """Our text weights (``cond_stage_model.*`` keys; other keys are ignored) -> (CLIPTextModel state dict, the rest).

    diffusers' ``convert_open_clip_checkpoint`` (SD 2) or ``convert_ldm_clip_checkpoint`` (SD 1) converts; what a
    ``CLIPTextModel`` has no place for (a penultimate tower's last block, ``text_projection``, ``logit_scale``) is
    returned under our keys. ``flat``: keys without ``text_model.`` (transformers >= 5.6 ``CLIPTextModel``).
    """
    target, _, _ = _text_node(text_node)
    dropped = _dropped_text_prefixes(text_node)
    prefix = OPENCLIP_PREFIX if target == OPENCLIP_TARGET else TEXT_PREFIX + "transformer."
    text = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    extra = {k: v for k, v in text.items()
             if k.startswith(dropped) or (target == OPENCLIP_TARGET and k[len(prefix):] in UNUSED_TEXT_TENSORS)}
    kept = {k: v for k, v in text.items() if k not in extra}
    c = converters()
    if target == OPENCLIP_TARGET:
        if c.convert_open_clip is None:
            raise MissingExtraError(f"this diffusers ({c.source}) has no convert_open_clip_checkpoint; {EXTRA_HINT}")
        # Under a neutral prefix: diffusers' SD 2 path skips resblocks.23 by its full key name (ViT-H's penultimate
        # layer), which for another tower would be a block to keep; the blocks to skip are left out above instead.
        neutral = "ldm_text."
        width = int(next(v for k, v in kept.items() if k.endswith("ln_final.weight")).shape[0])
        stub = _TextModelStub(width)
        converted = c.convert_open_clip(stub, {neutral + k[len(prefix):]: v for k, v in kept.items()}, prefix=neutral)
    else:
        if c.convert_clip is None:
            raise MissingExtraError(f"this diffusers ({c.source}) has no convert_ldm_clip_checkpoint; {EXTRA_HINT}")
        converted = c.convert_clip(kept)
    converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
    if flat:
        converted = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in converted.items()}
    return converted, extra


class _TextModelStub:
    """What ``convert_open_clip_checkpoint`` reads of its ``text_model`` argument: ``config.hidden_size``."""

    def __init__(self, hidden_size: int):
        self.config = type("Config", (), {"hidden_size": hidden_size})()


def _clip_text_model(config_kwargs: Mapping[str, Any]):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**config_kwargs))


def _is_flat(text_model: nn.Module) -> bool:
    return not hasattr(text_model, "text_model")


def clip_tokenizer(pad_token: str, max_length: int = 77):
    """transformers' ``CLIPTokenizer`` on OpenAI's BPE (written offline), tokenizing as our text encoders do."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_clip_tokenizer_files(tmp)
        return CLIPTokenizer(vocab, merges, pad_token=pad_token, model_max_length=int(max_length),
                             split_special_tokens=True)


# ================================================================================================ exact inverses


@dataclass
class _Piece:
    their_key: str
    their_index: Optional[torch.Tensor]  # flat positions in their tensor (None: all, in order)
    our_index: Optional[torch.Tensor]  # flat positions in ours (None: all, in order)


def inverse_plan(forward: Callable[[dict], Mapping[str, torch.Tensor]], shapes: Mapping[str, torch.Size],
                 budget: int = 2**26) -> tuple[dict[str, list[_Piece]], dict[str, torch.Size]]:
    """Where each element of our tensors ends up under ``forward`` (a key-renaming / slicing / reshaping converter).

    Our tensors are replaced by float64 tensors numbering every element uniquely (exact below 2**53), at most
    ``budget`` elements at a time (the rest stand in as ``-1``, expanded: no memory); ``forward`` of them tells, for
    each output element, the key and flat index it came from. Returns ``(plan, their_shapes)``: ``plan[our_key]`` is
    the list of pieces that fill it (empty: ``forward`` drops that tensor). ``ValueError`` when ``forward`` computes
    rather than moves (an output value that is not one of the input elements), or a tensor is only partly carried.
    """
    keys = list(shapes)
    numels = {k: math.prod(shapes[k]) for k in keys}
    batches, batch, size = [], [], 0
    for key in keys:
        if batch and size + numels[key] > budget:
            batches.append(batch)
            batch, size = [], 0
        batch.append(key)
        size += numels[key]
    batches.append(batch)
    plan: dict[str, list[_Piece]] = {k: [] for k in keys}
    their_shapes: dict[str, torch.Size] = {}
    filler = torch.full((), -1.0, dtype=torch.float64)
    for batch in batches:
        offsets, total = {}, 0
        for key in batch:
            offsets[key] = total
            total += numels[key]
        if total >= 2**53:
            raise ValueError("inverse_plan: budget too large for exact float64 numbering")
        probe = {k: (torch.arange(offsets[k], offsets[k] + numels[k], dtype=torch.float64).reshape(shapes[k])
                     if k in offsets else filler.expand(shapes[k])) for k in keys}
        out = forward(probe)
        starts = torch.tensor([offsets[k] for k in batch], dtype=torch.float64)
        for their_key, tensor in out.items():
            their_shapes[their_key] = tensor.shape
            if tensor.numel() == 0 or float(tensor.max()) < 0:
                continue
            flat = tensor.reshape(-1)
            if not bool(((flat == flat.round()) & (flat >= -1) & (flat < total)).all()):
                raise ValueError(f"inverse_plan: {their_key} holds computed values, not moved ones: the converter "
                                 "is not a pure rearrangement and cannot be inverted exactly")
            hit = flat >= 0
            positions = hit.nonzero().squeeze(1)
            values = flat[hit]
            owner = torch.searchsorted(starts, values, right=True) - 1
            for i in owner.unique().tolist():
                key = batch[i]
                mask = owner == i
                our_index = (values[mask] - offsets[key]).long()
                their_index = positions[mask]
                n = numels[key]
                if (our_index.numel() == n == flat.numel() and bool((our_index == torch.arange(n)).all())
                        and bool((their_index == torch.arange(n)).all())):
                    plan[key].append(_Piece(their_key, None, None))
                else:
                    plan[key].append(_Piece(their_key, their_index, our_index))
    for key, pieces in plan.items():
        if not pieces:
            continue
        covered = torch.cat([p.our_index if p.our_index is not None else torch.arange(numels[key]) for p in pieces])
        if covered.numel() < numels[key] or torch.unique(covered).numel() != numels[key]:
            raise ValueError(f"inverse_plan: {key} is only partly carried by the converter")
    return plan, their_shapes


def apply_inverse(plan: Mapping[str, list], shapes: Mapping[str, torch.Size],
                  theirs: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Our tensors from ``theirs`` by ``plan`` (:func:`inverse_plan`); keys ``plan`` leaves empty are omitted."""
    ours = {}
    for key, pieces in plan.items():
        if not pieces:
            continue
        shape = shapes[key]
        if len(pieces) == 1 and pieces[0].their_index is None:
            ours[key] = theirs[pieces[0].their_key].reshape(shape)
            continue
        first = theirs[pieces[0].their_key]
        flat = torch.empty(math.prod(shape), dtype=first.dtype, device=first.device)
        for piece in pieces:
            source = theirs[piece.their_key].reshape(-1)
            values = source if piece.their_index is None else source[piece.their_index]
            if piece.our_index is None:
                flat.copy_(values)
            else:
                flat[piece.our_index] = values
        ours[key] = flat.reshape(shape)
    return ours


def _check_theirs(theirs: Mapping[str, torch.Tensor], their_shapes: Mapping[str, torch.Size], what: str) -> None:
    missing = sorted(set(their_shapes) - set(theirs))
    unexpected = sorted(set(theirs) - set(their_shapes))
    wrong = [f"{k} (folder {tuple(theirs[k].shape)}, config {tuple(their_shapes[k])})"
             for k in sorted(set(theirs) & set(their_shapes)) if tuple(theirs[k].shape) != tuple(their_shapes[k])]
    if missing or unexpected or wrong:
        raise ValueError(f"{what}: the folder's weights do not fit its config; missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shapes differ {wrong[:3]}")


# ================================================================================================ export


def _part_configs(config: Mapping[str, Any]) -> dict:
    """The diffusers configs our model config converts to: ``unet``, ``vae``, ``text_encoder`` (CLIPTextConfig
    keywords), ``tokenizer`` (pad token, max length), ``scheduler``."""
    config = to_container(dict(config))
    if config.get("pooled_context") is not None:
        raise ValueError("pooled_context: diffusers' text-to-image pipelines give the UNet no pooled prompt; this "
                         "model cannot be converted to diffusers")
    unet_params = dict(config["unet"]["params"])
    ae = dict(config["autoencoder"]["params"])
    target, text_params, _ = _text_node(config["text_encoder"])
    return {
        "unet": diffusers_unet_config(unet_params, sample_size=int(full_unet_params(unet_params)["image_size"])),
        "vae": diffusers_vae_config(ae["ddconfig"], int(ae["embed_dim"]), scale_factor=float(config["scale_factor"])),
        "text_encoder": diffusers_text_encoder_config(config["text_encoder"]),
        "tokenizer": {"pad_token": EOT_TOKEN if target == CLIP_TARGET else "!",
                      "model_max_length": int(text_params.get("max_length", 77))},
        "scheduler": ddim_scheduler_config(config["schedule"].get("params") or {},
                                           config.get("parameterization", "eps"),
                                           (config.get("sampler_defaults") or {}).get("ddim")),
    }


def _unet_forward(unet_config: dict) -> Callable[[dict], dict]:
    return lambda sd: converters().convert_unet({k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}, unet_config)


def _vae_forward(vae_config: dict) -> Callable[[dict], dict]:
    return lambda sd: converters().convert_vae({k: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}, vae_config)


def _text_forward(text_node: Mapping[str, Any], flat: bool) -> Callable[[dict], dict]:
    return lambda sd: convert_text_state_dict(text_node, sd, flat=flat)[0]


def _pipeline_class(config: Mapping[str, Any]):
    import diffusers

    return diffusers.StableDiffusionInpaintPipeline if config.get("inpainting") else diffusers.StableDiffusionPipeline


def to_diffusers_pipeline(model, dtype: Optional[torch.dtype] = None):
    """``(pipeline, extra)``: a diffusers ``StableDiffusionPipeline`` holding copies of ``model``'s weights, and the
    text-tower tensors it has no place for (our keys; see the module docstring)."""
    require_diffusers("exporting to diffusers")
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    if model.config is None:
        raise ValueError("this model was built without a config; build it with LatentDiffusion.from_config")
    config = to_container(model.config)
    parts = _part_configs({**config, "scale_factor": model.scale_factor, "parameterization": model.parameterization,
                           "sampler_defaults": model.sampler_defaults})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    unet = _build(UNet2DConditionModel, parts["unet"], _unet_forward(parts["unet"])(state), "UNet conversion")
    vae = _build(AutoencoderKL, parts["vae"], _vae_forward(parts["vae"])(state), "VAE conversion")
    text_encoder = _clip_text_model(parts["text_encoder"])
    text_sd, extra = convert_text_state_dict(config["text_encoder"], state, flat=_is_flat(text_encoder))
    _strict_load(text_encoder, {k: v.clone() for k, v in text_sd.items()}, "text encoder conversion", assign=False)
    tokenizer = clip_tokenizer(parts["tokenizer"]["pad_token"], parts["tokenizer"]["model_max_length"])
    scheduler = DDIMScheduler.from_config(parts["scheduler"])
    pipeline = _pipeline_class(config)(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                       unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    changed = [k for k in ("steps_offset", "clip_sample") if pipeline.scheduler.config[k] != parts["scheduler"][k]]
    if changed and not (changed == ["steps_offset"] and parts["scheduler"]["timestep_spacing"] != "leading"):
        logger.warning("StableDiffusionPipeline reset the scheduler's %s (%s): diffusers' DDIM will not step as our "
                       "sampler_defaults['ddim'] %s say", changed, {k: pipeline.scheduler.config[k] for k in changed},
                       model.sampler_defaults.get("ddim"))
    extra = {k: v.clone().contiguous() for k, v in extra.items()}
    if dtype is not None:
        pipeline.to(dtype=dtype)
        extra = {k: v.to(dtype) if v.is_floating_point() else v for k, v in extra.items()}
    return pipeline, extra


def save_diffusers(model, out: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Write ``model`` as a diffusers folder ``out`` (which must not exist, or be empty); returns ``[out]``.

    ``StableDiffusionPipeline.from_pretrained(out)`` loads it offline and samples what ``model.sample`` samples
    with DDIM. See the module docstring for the layout and :func:`load_diffusers` for the way back.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: a diffusers export is a new folder; {out} exists and is not an empty folder")
    pipeline, extra = to_diffusers_pipeline(model, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        _portable_text_encoder_files(tmp)
        ldm = {"format": "latent-diffusion-lab", "note": "our model config; diffusers ignores this file",
               "config": {**to_container(model.config), "scale_factor": model.scale_factor,
                          "parameterization": model.parameterization, "sampler_defaults": model.sampler_defaults}}
        (tmp / LDM_CONFIG_FILE).write_text(json.dumps(ldm, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        if extra:
            save_file(extra, str(tmp / "text_encoder" / TEXT_EXTRA_FILE),
                      metadata={"format": "pt", "note": "text-tower tensors CLIPTextModel has no place for "
                                                        "(our keys); read by ldm.interop.diffusers"})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [str(out)]


def _portable_text_encoder_files(folder: Path) -> None:
    """What published SD folders hold, so that older transformers read the folder too: the text encoder's weights
    under ``text_model.*`` (transformers >= 5.6 writes them without that level, and reads both), and the tokenizer's
    ``vocab.json`` / ``merges.txt`` beside ``tokenizer.json`` (transformers 4's slow ``CLIPTokenizer`` reads those)."""
    from safetensors.torch import load_file, save_file

    weights = folder / "text_encoder" / "model.safetensors"
    if weights.is_file():
        state = load_file(str(weights))
        if not any(k.startswith("text_model.") for k in state):
            save_file({"text_model." + k: v for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    tokenizer = folder / "tokenizer"
    if not (tokenizer / "vocab.json").exists():
        write_clip_tokenizer_files(tokenizer)


# ================================================================================================ import


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A folder with a ``model_index.json`` (a diffusers pipeline)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def _signature_defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self", "kwargs") and p.default is not inspect.Parameter.empty}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


_PER_LEVEL = ("attention_head_dim", "num_attention_heads", "layers_per_block", "transformer_layers_per_block",
              "only_cross_attention", "cross_attention_dim")


def _normalized(cls, config: Mapping[str, Any], ignore: tuple = ()) -> dict:
    """A diffusers config with every ``__init__`` argument (defaults filled), plain lists, per-level scalars spread."""
    full = {**_signature_defaults(cls), **{k: v for k, v in config.items() if not k.startswith("_")}}
    full = {k: _plain(v) for k, v in full.items() if k not in ignore and k in _signature_defaults(cls)}
    levels = len(full.get("block_out_channels") or [])
    if cls.__name__ == "UNet2DConditionModel":
        heads = full.pop("num_attention_heads", None)
        full["attention_head_dim"] = heads if heads is not None else full["attention_head_dim"]
        for key in _PER_LEVEL:
            if key in full and not isinstance(full[key], list) and full[key] is not None:
                full[key] = [full[key]] * levels
    return full


def _diff(a: Mapping, b: Mapping) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def unet_params_from_diffusers(config: Mapping[str, Any]) -> dict:
    """Our ``UNetModel`` params from a diffusers ``UNet2DConditionModel`` config (checked: converting them back with
    diffusers' function gives that config, else ``ValueError`` naming what differs)."""
    from diffusers import UNet2DConditionModel

    c = _normalized(UNet2DConditionModel, config)
    channels = list(c["block_out_channels"])
    base = channels[0]
    down = list(c["down_block_types"])
    heads = list(c["attention_head_dim"])
    depth = c["transformer_layers_per_block"]
    problems = []
    if any(ch % base for ch in channels):
        problems.append(f"block_out_channels {channels} are not multiples of the first")
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        problems.append(f"down_block_types {down}")
    if len(set(c["layers_per_block"])) != 1 or len(set(map(str, depth))) != 1 or isinstance(depth[0], list):
        problems.append(f"per-level layers_per_block {c['layers_per_block']} / transformer_layers_per_block {depth}")
    if problems:
        raise ValueError("this diffusers UNet has no UNetModel equivalent here: " + "; ".join(problems))
    params: dict[str, Any] = {
        "image_size": int(c["sample_size"]), "in_channels": int(c["in_channels"]),
        "out_channels": int(c["out_channels"]), "model_channels": base,
        "channel_mult": [ch // base for ch in channels], "num_res_blocks": int(c["layers_per_block"][0]),
        "attention_resolutions": [2**i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"],
        "use_spatial_transformer": True, "transformer_depth": int(depth[0]),
        "context_dim": int(c["cross_attention_dim"][0]), "use_linear_in_transformer": bool(c["use_linear_projection"]),
        "legacy": False,
    }
    if len(set(heads)) == 1:
        params["num_heads"] = int(heads[0])
    elif len({ch // h for ch, h in zip(channels, heads)}) == 1 and all(ch % h == 0 for ch, h in zip(channels, heads)):
        params["num_head_channels"] = channels[0] // heads[0]
    else:
        raise ValueError(f"this diffusers UNet's heads per level {heads} are neither constant nor a constant width")
    differences = _diff(_normalized(UNet2DConditionModel, diffusers_unet_config(params, params["image_size"]),
                                    ignore=("upcast_attention",)),
                        _normalized(UNet2DConditionModel, config, ignore=("upcast_attention",)))
    if differences:
        raise ValueError("this diffusers UNet has no UNetModel equivalent here: " + "; ".join(differences))
    return params


def vae_params_from_diffusers(config: Mapping[str, Any]) -> dict:
    """Our ``AutoencoderKL`` node params (``ddconfig``, ``embed_dim``) from a diffusers ``AutoencoderKL`` config."""
    from diffusers import AutoencoderKL

    c = _normalized(AutoencoderKL, config)
    channels = list(c["block_out_channels"])
    if any(ch % channels[0] for ch in channels):
        raise ValueError(f"this diffusers VAE's block_out_channels {channels} are not multiples of the first")
    ddconfig = {"double_z": True, "z_channels": int(c["latent_channels"]), "resolution": int(c["sample_size"]),
                "in_channels": int(c["in_channels"]), "out_ch": int(c["out_channels"]), "ch": channels[0],
                "ch_mult": [ch // channels[0] for ch in channels], "num_res_blocks": int(c["layers_per_block"]),
                "attn_resolutions": [], "dropout": 0.0}
    params = {"ddconfig": ddconfig, "embed_dim": int(c["latent_channels"])}
    ignore = ("scaling_factor", "force_upcast")
    differences = _diff(_normalized(AutoencoderKL, diffusers_vae_config(ddconfig, params["embed_dim"]), ignore),
                        _normalized(AutoencoderKL, config, ignore))
    if differences:
        raise ValueError("this diffusers VAE has no AutoencoderKL equivalent here: " + "; ".join(differences))
    return params


def _text_arch(model_config: dict) -> str:
    from ldm.interop.sd_config import _open_clip_config

    for arch in ("ViT-L-14-quickgelu", "ViT-H-14", "ViT-bigG-14"):
        if _open_clip_config(arch) == model_config:
            return arch
    return "from-diffusers"


def text_node_from_diffusers(text_config: Mapping[str, Any], pad_token: str, max_length: int,
                             extra: Mapping[str, torch.Tensor]) -> dict:
    """Our text-encoder config node from a ``CLIPTextConfig`` (dict), the tokenizer's pad token and length, and the
    folder's extra text tensors: pad ``<|endoftext|>`` is SD 1's ``FrozenCLIPEmbedder``, ``!`` SD 2's
    ``FrozenOpenCLIPEmbedder``; an extra last block means a penultimate tower of one block more."""
    c = dict(text_config)
    if pad_token == EOT_TOKEN:
        target, prefix = CLIP_TARGET, HF_CLIP_PREFIX + "encoder.layers."
    elif pad_token == "!":
        target, prefix = OPENCLIP_TARGET, OPENCLIP_PREFIX + "transformer.resblocks."
    else:
        raise ValueError(f"tokenizer pad token {pad_token!r}: neither SD 1's <|endoftext|> nor SD 2's '!'; our text "
                         "encoders pad one of these two ways")
    if c.get("hidden_act") not in ("gelu", "quick_gelu"):
        raise ValueError(f"text encoder hidden_act {c.get('hidden_act')!r} (gelu or quick_gelu only)")
    layers = int(c["num_hidden_layers"])
    penultimate = any(k.startswith(f"{prefix}{layers}.") for k in extra)
    width = int(c["hidden_size"])
    text_cfg: dict[str, Any] = {"context_length": int(c["max_position_embeddings"]), "vocab_size": int(c["vocab_size"]),
                                "width": width, "heads": int(c["num_attention_heads"]),
                                "layers": layers + (1 if penultimate else 0)}
    if int(c["intermediate_size"]) != 4 * width:
        text_cfg["mlp_ratio"] = int(c["intermediate_size"]) / width
    if float(c.get("layer_norm_eps", 1e-5)) != 1e-5:
        text_cfg["norm_kwargs"] = {"eps": float(c["layer_norm_eps"])}
    if target == OPENCLIP_TARGET and OPENCLIP_PREFIX + "text_projection" not in extra:
        text_cfg["proj_type"] = "none"  # a folder without our extras: no projection to make up
    model_config: dict[str, Any] = {"embed_dim": int(c.get("projection_dim", width))}
    if c["hidden_act"] == "quick_gelu":
        model_config["quick_gelu"] = True
    model_config["text_cfg"] = text_cfg
    return {"target": target, "params": {"arch": _text_arch(model_config), "version": None,
                                         "layer": "penultimate" if penultimate else "last",
                                         "max_length": int(max_length), "model_config": model_config}}


_SCHEDULES_BACK = {v: k for k, v in DIFFUSERS_BETA_SCHEDULES.items()}
_PREDICTIONS_BACK = {v: k for k, v in PREDICTION_TYPES.items()}


def schedule_from_diffusers(config: Mapping[str, Any]) -> tuple[dict, str, dict]:
    """(our schedule node, parameterization, our DDIM sampler defaults) from a diffusers scheduler config (any of
    the DDPM-family schedulers: the beta fields mean the same in all of them)."""
    c = dict(config)
    problems = []
    if c.get("prediction_type", "epsilon") not in _PREDICTIONS_BACK:
        problems.append(f"prediction_type {c.get('prediction_type')!r}")
    params: dict[str, Any] = {}
    if c.get("trained_betas") is not None:
        params["betas"] = [float(b) for b in c["trained_betas"]]
    else:
        kind = _SCHEDULES_BACK.get(c.get("beta_schedule", "linear"))
        if kind is None:
            problems.append(f"beta_schedule {c.get('beta_schedule')!r}")
        else:
            params = {"kind": kind, "num_timesteps": int(c.get("num_train_timesteps", 1000))}
            if kind != "cosine":
                params["beta_start"] = float(c.get("beta_start", 0.0001))
                params["beta_end"] = float(c.get("beta_end", 0.02))
    if c.get("rescale_betas_zero_snr"):
        params["rescale_zero_terminal_snr"] = True
    for key in ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if c.get(key):
            problems.append(f"{key}=True")
    if problems:
        raise ValueError("this diffusers scheduler has no equivalent here: " + "; ".join(problems))
    ddim: dict[str, Any] = {}
    spacing = c.get("timestep_spacing", "leading")
    if spacing != "leading":
        ddim["timestep_spacing"] = spacing
    elif int(c.get("steps_offset", 0)) != 1:
        ddim["steps_offset"] = int(c.get("steps_offset", 0))
    if c.get("set_alpha_to_one"):
        ddim["set_alpha_to_one"] = True
    if c.get("clip_sample"):
        ddim["clip_denoised"] = float(c.get("clip_sample_range", 1.0))
    return ({"target": "ldm.diffusion.NoiseSchedule", "params": params},
            _PREDICTIONS_BACK[c.get("prediction_type", "epsilon")], ddim)


def _read_folder(folder: Path) -> dict:
    """The folder's part configs and extras, checked to be a Stable Diffusion 1/2 pipeline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for name in ("text_encoder_2", "tokenizer_2", "transformer", "prior"):
        if (index.get(name) or [None])[0]:
            raise ValueError(f"{folder}: a {index.get('_class_name')} ({name}); only Stable Diffusion 1/2 pipelines "
                             "(unet, vae, text_encoder, tokenizer, scheduler) map to our model")
    missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (index.get(n) or [None])[0]]
    if missing:
        raise ValueError(f"{folder}: model_index.json lacks {missing}")
    if index["text_encoder"][1] != "CLIPTextModel":
        raise ValueError(f"{folder}: text_encoder is a {index['text_encoder'][1]}, not a CLIPTextModel")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    vocab, _ = _clip_bpe()
    theirs = tokenizer.get_vocab()
    if any(theirs.get(token) != i for token, i in vocab.items()) or len(theirs) != len(vocab):
        raise ValueError(f"{folder}/tokenizer: not OpenAI CLIP's BPE vocabulary (the one our text encoders use)")
    extra_path = folder / "text_encoder" / TEXT_EXTRA_FILE
    extra = {}
    if extra_path.is_file():
        from safetensors.torch import load_file

        extra = load_file(str(extra_path))
    ldm_path = folder / LDM_CONFIG_FILE
    stored = json.loads(ldm_path.read_text(encoding="utf-8"))["config"] if ldm_path.is_file() else None
    return {
        "index": index,
        "unet": dict(UNet2DConditionModel.load_config(str(folder / "unet"))),
        "vae": dict(AutoencoderKL.load_config(str(folder / "vae"))),
        "text_encoder": CLIPTextConfig.from_pretrained(str(folder / "text_encoder")).to_dict(),
        "tokenizer": {"pad_token": str(tokenizer.pad_token), "model_max_length": int(tokenizer.model_max_length)},
        "scheduler": json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")),
        "extra": extra,
        "stored": stored,
    }


_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim")


def config_from_diffusers(folder: str | os.PathLike) -> dict:
    """Our model config for a diffusers folder (see the module docstring for which parts come from where)."""
    require_diffusers("reading a diffusers folder")
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    folder = Path(folder)
    f = _read_folder(folder)
    stored = f["stored"]
    ours_parts = None
    if stored is not None:
        try:
            ours_parts = _part_configs(stored)
        except ValueError as error:
            logger.warning("%s: %s does not convert (%s); using the diffusers configs", folder, LDM_CONFIG_FILE, error)
            stored = None
    max_length = min(f["tokenizer"]["model_max_length"], int(f["text_encoder"]["max_position_embeddings"]))
    tokenizer = {"pad_token": f["tokenizer"]["pad_token"], "model_max_length": max_length}
    config: dict[str, Any] = {}

    def same(name, cls, ignore=()):
        if stored is None:
            return False
        equal = not _diff(_normalized(cls, ours_parts[name], ignore), _normalized(cls, f[name], ignore))
        if not equal:
            logger.info("%s: %s's %s differs from the folder's; the folder's is used", folder, LDM_CONFIG_FILE, name)
        return equal

    # UNet
    config["unet"] = (stored["unet"] if same("unet", UNet2DConditionModel, ("upcast_attention",)) else
                      {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                       "params": unet_params_from_diffusers(f["unet"])})
    # VAE
    config["autoencoder"] = (stored["autoencoder"]
                             if same("vae", AutoencoderKL, ("scaling_factor", "force_upcast")) else
                             {"target": "autoencoder.AutoencoderKL", "params": vae_params_from_diffusers(f["vae"])})
    config["scale_factor"] = float(f["vae"].get("scaling_factor", 0.18215))
    # text encoder + tokenizer
    # (a penultimate tower needs its last block from our extras: without them, the equivalent tower is derived)
    text_same = stored is not None and all(
        ours_parts["text_encoder"][k] == f["text_encoder"].get(k) for k in _TEXT_KEYS) and \
        ours_parts["tokenizer"] == tokenizer and \
        all(any(k.startswith(prefix) for k in f["extra"]) for prefix in _dropped_text_prefixes(stored["text_encoder"]))
    config["text_encoder"] = (stored["text_encoder"] if text_same else
                              text_node_from_diffusers(f["text_encoder"], tokenizer["pad_token"], max_length,
                                                       f["extra"]))
    # schedule, parameterization, sampler defaults
    schedule, parameterization, ddim = schedule_from_diffusers(f["scheduler"])
    if f["scheduler"].get("_class_name") == "DDIMScheduler" and same("scheduler", DDIMScheduler):
        config["schedule"] = stored["schedule"]
        config["parameterization"] = stored.get("parameterization", "eps")
        config["sampler_defaults"] = stored.get("sampler_defaults") or {}
    else:
        config["schedule"], config["parameterization"] = schedule, parameterization
        config["sampler_defaults"] = {"ddim": ddim} if ddim else {}
    # the image size
    vae_factor = 2 ** (len(config["autoencoder"]["params"]["ddconfig"]["ch_mult"]) - 1)
    image_size = int(config["unet"]["params"]["image_size"]) * vae_factor
    if stored is not None:
        config = {**{k: v for k, v in stored.items() if k not in config}, **config}
    config["image_size"] = image_size
    if f["index"].get("_class_name") == "StableDiffusionInpaintPipeline" or f["unet"].get("in_channels") == 9:
        config["inpainting"] = True
    return config


def load_diffusers(folder: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """A :class:`LatentDiffusion` from a diffusers Stable Diffusion 1/2 folder (ours or any), loaded strictly.

    The weights are mapped back by the exact inverse of diffusers' own converters (:func:`inverse_plan`); the text
    tensors a ``CLIPTextModel`` has no place for come from ``text_encoder/ldm_extra.safetensors`` (written by
    :func:`save_diffusers`); without it, a penultimate SD 2 encoder comes back as the equivalent ``layer="last"``
    tower of ``num_hidden_layers`` blocks, without a text projection.
    """
    require_diffusers("reading a diffusers folder")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ldm.interop.single_file import load_sd_weights
    from ldm.models.latent_diffusion import LatentDiffusion

    folder = Path(folder)
    if not is_diffusers_folder(folder):
        raise FileNotFoundError(f"{folder}: not a diffusers folder (no model_index.json)")
    config = config_from_diffusers(folder)
    model = LatentDiffusion.from_config(config)
    own = model.state_dict()
    parts = _part_configs(config)
    weights: dict[str, torch.Tensor] = {}

    def invert(forward, prefix, theirs, what):
        shapes = {k: v.shape for k, v in own.items() if k.startswith(prefix)}
        plan, their_shapes = inverse_plan(forward, shapes)
        _check_theirs(theirs, their_shapes, what)
        weights.update(apply_inverse(plan, shapes, theirs, what))
        return [k for k, pieces in plan.items() if not pieces]

    # use_safetensors: a folder from anyone may hold pickled .bin weights; those are refused, never unpickled
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", low_cpu_mem_usage=False,
                                                use_safetensors=True)
    invert(_unet_forward(parts["unet"]), UNET_PREFIX, unet.state_dict(), f"{folder}/unet")
    del unet
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", low_cpu_mem_usage=False, use_safetensors=True)
    invert(_vae_forward(parts["vae"]), VAE_PREFIX, vae.state_dict(), f"{folder}/vae")
    del vae
    text = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), use_safetensors=True)
    theirs = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    left = invert(_text_forward(config["text_encoder"], _is_flat(text)), TEXT_PREFIX, theirs,
                  f"{folder}/text_encoder")
    del text
    extra = _read_folder_extra(folder)
    for key in left:
        if key in extra:
            weights[key] = extra[key]
        elif key[len(OPENCLIP_PREFIX):] in UNUSED_TEXT_TENSORS:
            weights[key] = own[key]  # CLIP's contrastive head: unused by our encoding, kept at its init value
            logger.info("%s: no %s in the folder; keeping its initial value (our text encoding does not use it)",
                        folder, key)
        else:
            raise ValueError(f"{folder}: the text encoder lacks {key} (and text_encoder/{TEXT_EXTRA_FILE} does not "
                             "have it)")
    unknown = sorted(set(extra) - set(left))
    if unknown:
        raise ValueError(f"{folder}/text_encoder/{TEXT_EXTRA_FILE}: tensors {unknown[:5]} have no place in the model")
    load_sd_weights(model, weights, str(folder))
    return model.to(map_location).eval()


def _read_folder_extra(folder: Path) -> dict:
    path = folder / "text_encoder" / TEXT_EXTRA_FILE
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))
