"""Stable Diffusion's original inference YAML (``v1-inference.yaml``, ``v2-inference(-v).yaml``, ...) as our config.

SD's file says ``model.target: ldm.models.diffusion.ddpm.LatentDiffusion`` with ``params`` holding the schedule
(``linear_start``, ``linear_end``, ``timesteps``, ``beta_schedule``), ``parameterization``, ``scale_factor`` and three
nodes: ``unet_config``, ``first_stage_config``, ``cond_stage_config``. Nothing in it is imported: each SD class name
is looked up in :data:`SD_TARGETS` and mapped to ours, and any other name is an error naming it and the file.

Two meanings differ between SD and us, and are translated here:

* SD's ``beta_schedule: linear`` is linear in ``sqrt(beta)`` (SD's ``make_beta_schedule``), which is our
  ``scaled_linear``; our ``linear`` is linear in ``beta``.
* SD's text encoders are built from downloaded weights; ours are built at the architecture's size (open_clip's
  config, no download) and take their weights from the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from omegaconf import OmegaConf

from ldm.util import ConfigError, to_container

SD_MODEL_TARGETS = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": "txt2img",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": "inpainting",
}
SD_UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
SD_AUTOENCODER_TARGET = "ldm.models.autoencoder.AutoencoderKL"
SD_OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
SD_CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
SD_TARGETS = (*SD_MODEL_TARGETS, SD_UNET_TARGET, SD_AUTOENCODER_TARGET, SD_OPENCLIP_TARGET, SD_CLIP_TARGET)

# SD's own defaults (ldm/models/diffusion/ddpm.py DDPM.__init__), used where the YAML leaves a key out
SD_DEFAULTS = {"linear_start": 1e-4, "linear_end": 2e-2, "timesteps": 1000, "beta_schedule": "linear",
               "parameterization": "eps", "scale_factor": 1.0}
# SD v1's FrozenCLIPEmbedder: OpenAI CLIP ViT-L/14 from Hugging Face, which is open_clip's quick-gelu ViT-L/14
SD_CLIP_VERSIONS = {"openai/clip-vit-large-patch14": "ViT-L-14-quickgelu"}


def _target(node: Any, where: str, source: str, allowed: tuple[str, ...]) -> tuple[str, dict]:
    if not isinstance(node, Mapping) or "target" not in node:
        raise ConfigError(f"{source}: {where} must be a mapping with a 'target', got {node!r}")
    target = node["target"]
    if target not in allowed:
        raise ConfigError(f"{source}: {where}.target {target!r} is not a Stable Diffusion class this loader maps "
                          f"(it maps {', '.join(allowed)})")
    return target, dict(node.get("params") or {})


def _schedule(params: Mapping[str, Any], source: str) -> dict:
    kind = params.get("beta_schedule", SD_DEFAULTS["beta_schedule"])
    if params.get("given_betas") is not None:
        raise ConfigError(f"{source}: model.params.given_betas is not supported; the betas come from beta_schedule")
    steps = int(params.get("timesteps", SD_DEFAULTS["timesteps"]))
    if kind == "linear":  # linear in sqrt(beta): our scaled_linear
        return {"target": "ldm.diffusion.NoiseSchedule",
                "params": {"kind": "scaled_linear", "num_timesteps": steps,
                           "beta_start": float(params.get("linear_start", SD_DEFAULTS["linear_start"])),
                           "beta_end": float(params.get("linear_end", SD_DEFAULTS["linear_end"]))}}
    if kind == "sqrt_linear":  # SD's name for betas linear in beta: our linear
        return {"target": "ldm.diffusion.NoiseSchedule",
                "params": {"kind": "linear", "num_timesteps": steps,
                           "beta_start": float(params.get("linear_start", SD_DEFAULTS["linear_start"])),
                           "beta_end": float(params.get("linear_end", SD_DEFAULTS["linear_end"]))}}
    if kind == "cosine":
        if float(params.get("cosine_s", 8e-3)) != 8e-3:
            raise ConfigError(f"{source}: model.params.cosine_s other than 0.008 is not supported")
        return {"target": "ldm.diffusion.NoiseSchedule", "params": {"kind": "cosine", "num_timesteps": steps}}
    raise ConfigError(f"{source}: model.params.beta_schedule {kind!r} is not supported (linear, sqrt_linear or cosine)")


def _text_encoder(node: Any, source: str) -> dict:
    target, params = _target(node, "model.params.cond_stage_config", source, (SD_OPENCLIP_TARGET, SD_CLIP_TARGET))
    layer = params.get("layer", "last")
    max_length = int(params.get("max_length", 77))
    if target == SD_OPENCLIP_TARGET:
        arch = params.get("arch", "ViT-H-14")
        ours = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
    else:
        version = params.get("version", "openai/clip-vit-large-patch14")
        if version not in SD_CLIP_VERSIONS:
            raise ConfigError(f"{source}: cond_stage_config.params.version {version!r} is not supported "
                              f"(known: {', '.join(SD_CLIP_VERSIONS)})")
        arch = SD_CLIP_VERSIONS[version]
        ours = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    # model_config (ours, not SD's): an explicit open_clip config, for towers of other sizes (tests build tiny ones)
    model_config = params.get("model_config") or _open_clip_config(arch)
    if model_config is None:
        raise ConfigError(f"{source}: cond_stage_config.params.arch {arch!r} is not an open_clip architecture")
    return {"target": ours, "params": {"arch": arch, "version": None, "layer": layer, "max_length": max_length,
                                       "model_config": model_config}}


def sd_config_to_ours(config: Any, source: str | os.PathLike = "<config>") -> dict:
    """Our model config (``autoencoder``, ``text_encoder``, ``unet``, ``schedule`` nodes, ``scale_factor``,
    ``parameterization``, ``image_size``, ``variant``) from SD's original inference config (a mapping or OmegaConf).

    ``ConfigError`` naming the key and ``source`` for anything this loader cannot map.
    """
    source = os.fspath(source)
    config = to_container(config)
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise ConfigError(f"{source}: not a Stable Diffusion config (no 'model' section)")
    model_target, params = _target(config["model"], "model", source, tuple(SD_MODEL_TARGETS))
    for key in ("unet_config", "first_stage_config", "cond_stage_config"):
        if key not in params:
            raise ConfigError(f"{source}: model.params has no {key!r}")
    if params.get("conditioning_key", "crossattn") not in ("crossattn", "hybrid"):
        raise ConfigError(f"{source}: model.params.conditioning_key {params['conditioning_key']!r} is not supported")

    _, unet = _target(params["unet_config"], "model.params.unet_config", source, (SD_UNET_TARGET,))
    _, first_stage = _target(params["first_stage_config"], "model.params.first_stage_config", source,
                             (SD_AUTOENCODER_TARGET,))
    if "ddconfig" not in first_stage or "embed_dim" not in first_stage:
        raise ConfigError(f"{source}: model.params.first_stage_config.params needs ddconfig and embed_dim")
    parameterization = params.get("parameterization", SD_DEFAULTS["parameterization"])
    if parameterization not in ("eps", "x0", "v"):
        raise ConfigError(f"{source}: model.params.parameterization {parameterization!r} is not eps, x0 or v")
    latent_size = int(params.get("image_size", unet.get("image_size", 64)))
    factor = 2 ** (len(first_stage["ddconfig"].get("ch_mult", [1, 2, 4, 4])) - 1)
    return {
        "variant": SD_MODEL_TARGETS[model_target],
        "image_size": latent_size * factor,
        "scale_factor": float(params.get("scale_factor", SD_DEFAULTS["scale_factor"])),
        "parameterization": parameterization,
        "autoencoder": {"target": "autoencoder.AutoencoderKL",
                        "params": {"ddconfig": dict(first_stage["ddconfig"]), "embed_dim": int(first_stage["embed_dim"])}},
        "text_encoder": _text_encoder(params["cond_stage_config"], source),
        "unet": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(unet)},
        "schedule": _schedule(params, source),
    }


def ours_to_sd_config(config: Mapping[str, Any]) -> dict:
    """SD's original inference config (``v2-inference.yaml`` layout) for one of our model configs: the inverse of
    :func:`sd_config_to_ours`. ``ConfigError`` for what SD's code cannot express (a zero-terminal-SNR or explicit-beta
    schedule, another text encoder class)."""
    config = to_container(config)
    if config.get("pooled_context") is not None:
        raise ConfigError("pooled_context: SD's LatentDiffusion gives its UNet no pooled prompt (no Stable Diffusion "
                          "equivalent)")
    schedule = dict(config["schedule"].get("params") or {})
    kind = schedule.get("kind", "scaled_linear")
    if schedule.get("rescale_zero_terminal_snr") or schedule.get("betas") is not None:
        raise ConfigError("schedule: a zero-terminal-SNR or explicit-beta schedule has no Stable Diffusion equivalent")
    params: dict[str, Any] = {"timesteps": int(schedule.get("num_timesteps", 1000))}
    if kind == "cosine":
        params["beta_schedule"] = "cosine"
    else:
        from ldm.diffusion.schedules import DEFAULT_BETA_ENDPOINTS

        start, end = DEFAULT_BETA_ENDPOINTS[kind]
        params.update(beta_schedule="linear" if kind == "scaled_linear" else "sqrt_linear",
                      linear_start=float(schedule.get("beta_start") or start),
                      linear_end=float(schedule.get("beta_end") or end))
    unet = dict(config["unet"]["params"])
    autoencoder = dict(config["autoencoder"]["params"])
    factor = 2 ** (len(autoencoder["ddconfig"].get("ch_mult", [1, 2, 4, 4])) - 1)
    text = config["text_encoder"]
    text_params = dict(text.get("params") or {})
    text_target = {"ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": SD_OPENCLIP_TARGET,
                   "ldm.modules.encoders.modules.FrozenCLIPEmbedder": SD_CLIP_TARGET}.get(text["target"])
    if text_target is None:
        raise ConfigError(f"text_encoder: {text['target']} has no Stable Diffusion equivalent")
    cond_params = {"freeze": True, "layer": text_params.get("layer", "last")}
    if text_target == SD_OPENCLIP_TARGET:
        cond_params["arch"] = text_params.get("arch", "ViT-H-14")
    if text_params.get("max_length", 77) != 77:
        cond_params["max_length"] = int(text_params["max_length"])
    standard = _open_clip_config(cond_params.get("arch", SD_CLIP_VERSIONS["openai/clip-vit-large-patch14"]))
    if text_params.get("model_config") is not None and text_params["model_config"] != standard:
        # ours, not SD's: a text tower of a size open_clip has no name for (SD's own code cannot build it)
        cond_params["model_config"] = text_params["model_config"]
    params.update(
        parameterization=config.get("parameterization", "eps"),
        scale_factor=float(config["scale_factor"]),
        image_size=int(config.get("image_size", unet.get("image_size", 64) * factor)) // factor,
        channels=int(unet.get("out_channels", 4)),
        conditioning_key="hybrid" if config.get("inpainting") else "crossattn",
        cond_stage_trainable=False,
        use_ema=False,
        unet_config={"target": SD_UNET_TARGET, "params": unet},
        first_stage_config={"target": SD_AUTOENCODER_TARGET, "params": {
            "embed_dim": int(autoencoder["embed_dim"]), "ddconfig": dict(autoencoder["ddconfig"]),
            "lossconfig": {"target": "torch.nn.Identity"}}},
        cond_stage_config={"target": text_target, "params": cond_params},
    )
    model_target = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion" if config.get("inpainting") else \
        "ldm.models.diffusion.ddpm.LatentDiffusion"
    return {"model": {"target": model_target, "params": params}}


def _open_clip_config(arch: str) -> dict | None:
    """open_clip's config of a named architecture without its vision tower (what our text encoders are built from)."""
    from ldm.modules.encoders.modules import _open_clip

    config = _open_clip().get_model_config(arch)
    return None if config is None else {k: v for k, v in config.items() if k != "vision_cfg"}


def load_sd_config(path: str | os.PathLike) -> dict:
    """:func:`sd_config_to_ours` of a YAML file, by path or shipped name (``stable-diffusion/v2-inference-v``), read
    as plain data (nothing in it is imported)."""
    from ldm.util import find_config

    path = find_config(path)
    return sd_config_to_ours(OmegaConf.load(path), path)


def stock_config_path(variant: str) -> str:
    """The original inference YAML of a named variant, shipped in ``configs/stable-diffusion/``."""
    from ldm.util import find_config

    return find_config(f"stable-diffusion/{variant}")
