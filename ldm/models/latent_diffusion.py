"""The text-to-image latent diffusion model as one ``nn.Module`` (no training logic).

Submodule names follow Stable Diffusion's checkpoint layout, so ``state_dict()`` keys are
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (KL autoencoder) and ``cond_stage_model.*``
(text encoder), and a single ``.safetensors`` file with the config in its metadata rebuilds everything.

Latents: ``z = scale_factor * E(x)`` with ``scale_factor = 1 / std(E(x))`` measured on the data
(CompVis's ``scale_by_std``), so that the diffusion process sees roughly unit-variance latents.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ldm.checkpoint import load_config_from_checkpoint, load_into, load_state_dict, save_safetensors
from ldm.diffusion import NoiseSchedule, build_sampler, classifier_free_guidance
from ldm.diffusion.gaussian import randn
from ldm.util import ConfigError, check_keys, instantiate_from_config, to_container

CONFIG_KEYS = ("autoencoder", "text_encoder", "unet", "schedule")

# the rest a model config may hold (image_size: the pixel size it was trained at; inpainting: a 9-channel UNet)
OPTIONAL_CONFIG_KEYS = (
    "scale_factor", "parameterization", "sampler_defaults", "image_size", "inpainting", "pooled_context"
)


# ``pooled_context`` modes: the prompt as one vector, ``[B, L, D] -> [B, D]``; "mean": ``y = (1/L) sum_l context[:, l]``
POOLINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"mean": lambda context: context.mean(dim=1)}


def pool_context(context: torch.Tensor, mode: str) -> torch.Tensor:
    """The prompt as one vector by the ``pooled_context`` mode ``mode`` (:data:`POOLINGS`): ``[B, L, D] -> [B, D]``."""
    return POOLINGS[mode](context)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (SD's key prefix ``model.diffusion_model``).

    ``pooled_context``: also give the UNet the pooled context as its vector conditioning ``y``
    (:func:`pool_context`), which SD's UNet adds to the timestep embedding through ``label_emb`` (SDXL's path for
    its pooled text embedding), so every ResBlock sees the prompt and not only the cross-attention levels."""

    def __init__(self, diffusion_model: nn.Module, pooled_context: str | None = None):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.pooled_context = pooled_context

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooled_context is None:
            return self.diffusion_model(x, t, context=context)
        return self.diffusion_model(x, t, context=context, y=pool_context(context, self.pooled_context))


def _check_pooled_context(mode: Any, unet: nn.Module) -> None:
    """A pooled context needs a UNet built for a vector ``y`` as wide as its context, and such a UNet needs one."""
    if mode is None:
        if getattr(unet, "num_classes", None) is not None:
            raise ValueError(
                f"the UNet is built with num_classes={unet.num_classes!r} and needs a vector y, which a text-to-image "
                "model gets from its prompt: set the model's pooled_context: mean (with num_classes: sequential)"
            )
        return
    if mode not in POOLINGS:
        raise ValueError(f"pooled_context must be one of {tuple(POOLINGS)} or null, got {mode!r}")
    context_dim = getattr(unet, "context_dim", None)
    context_dim = context_dim[0] if isinstance(context_dim, (list, tuple)) else context_dim
    label_emb = getattr(unet, "label_emb", None)
    if getattr(unet, "num_classes", None) != "sequential" or label_emb is None:
        raise ValueError(
            f"pooled_context={mode!r} feeds the UNet a vector y: build it with num_classes: sequential and "
            f"adm_in_channels: {context_dim} (the context width)"
        )
    width = label_emb[0][0].in_features
    if width != context_dim:
        raise ValueError(
            f"pooled_context={mode!r}: the UNet's adm_in_channels is {width}, the pooled context has "
            f"context_dim={context_dim} features"
        )


class LatentDiffusion(nn.Module):
    """Frozen autoencoder + frozen text encoder + denoising UNet + noise schedule.

    Args:
        autoencoder: ``AutoencoderKL`` (``encode(x) -> posterior``, ``decode(z) -> x``).
        text_encoder: maps ``list[str]`` to context ``[B, L, D]`` (``FrozenOpenCLIPEmbedder``).
        unet: ``UNetModel`` with ``forward(x [B,C,h,w], t [B], context [B,L,D]) -> [B,C,h,w]``.
        schedule: ``NoiseSchedule`` (betas and derived tables).
        scale_factor: latent scale (1/std of the autoencoder's latents).
        parameterization: what the UNet predicts: ``eps``, ``x0`` or ``v``.
        config: the full config (``autoencoder``, ``text_encoder``, ``unet``, ``schedule`` nodes) kept for export.
        sampler_defaults: per-sampler keyword defaults this model was trained for, e.g.
            ``{"ddim": {"timestep_spacing": "trailing"}}`` for a schedule whose last step is pure noise; an
            explicit spec overrides them. Stored in the config (``sampler_defaults``), so exports keep them.
        pooled_context: ``"mean"`` to condition the UNet's ResBlocks on the mean of the context too
            (:class:`DiffusionWrapper`; the UNet needs ``num_classes: sequential``, ``adm_in_channels: context_dim``).
            Ours, not SD's: such a model does not export to SD or diffusers.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        text_encoder: nn.Module,
        unet: nn.Module,
        schedule: NoiseSchedule,
        scale_factor: float,
        parameterization: str = "eps",
        config: Mapping[str, Any] | None = None,
        sampler_defaults: Mapping[str, Mapping[str, Any]] | None = None,
        pooled_context: str | None = None,
    ):
        super().__init__()
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be 'eps', 'x0' or 'v', got {parameterization!r}")
        if not scale_factor or not float(scale_factor) > 0:
            raise ValueError(f"scale_factor must be a positive number, got {scale_factor!r}")
        _check_pooled_context(pooled_context, unet)
        self.first_stage_model = autoencoder.eval().requires_grad_(False)
        self.cond_stage_model = text_encoder
        self.model = DiffusionWrapper(unet, pooled_context)
        self.schedule = schedule
        self.scale_factor = float(scale_factor)
        self.parameterization = parameterization
        self.config = to_container(config) if config is not None else None
        self.sampler_defaults = {name: dict(kw) for name, kw in (to_container(sampler_defaults) or {}).items()}
        self._empty_context: torch.Tensor | None = None

    # ---------------------------------------------------------------- building
    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        autoencoder: nn.Module | None = None,
        scale_factor: float | None = None,
    ) -> "LatentDiffusion":
        """Build from a config with ``autoencoder``, ``text_encoder``, ``unet``, ``schedule`` nodes.

        ``scale_factor`` and ``parameterization`` are read from the config's top level unless given.
        A pre-loaded ``autoencoder`` (e.g. a stage-one weights file) replaces the config's node.
        """
        config = to_container(config)
        check_keys(config, CONFIG_KEYS + OPTIONAL_CONFIG_KEYS, "model")
        missing = [key for key in CONFIG_KEYS if key not in config]
        if missing:
            raise ConfigError(f"model config is missing node(s) {missing}; it needs {list(CONFIG_KEYS)}")
        if autoencoder is None:
            autoencoder = instantiate_from_config(config["autoencoder"], path="autoencoder")
        text_encoder = instantiate_from_config(config["text_encoder"], path="text_encoder")
        unet = instantiate_from_config(config["unet"], path="unet")
        schedule = instantiate_from_config(config["schedule"], path="schedule")
        scale = scale_factor if scale_factor is not None else config.get("scale_factor")
        if scale is None:
            raise ConfigError("model config has no 'scale_factor'; compute it with scripts/compute_scale_factor.py")
        return cls(
            autoencoder,
            text_encoder,
            unet,
            schedule,
            scale_factor=scale,
            parameterization=config.get("parameterization", "eps"),
            config={**config, "scale_factor": float(scale)},
            sampler_defaults=config.get("sampler_defaults"),
            pooled_context=config.get("pooled_context"),
        )

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "LatentDiffusion":
        """Rebuild from one ``.safetensors`` file written by :meth:`save` (weights + config in metadata)."""
        config = load_config_from_checkpoint(path)
        model = cls.from_config(config)
        load_into(model, load_state_dict(path, map_location=map_location), what=f"latent diffusion ({path})")
        return model

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        config: str | os.PathLike | Mapping[str, Any] | None = None,
        parameterization: str | None = None,
        use_ema: bool | None = None,
        map_location: str | torch.device = "cpu",
    ) -> "LatentDiffusion":
        """From an original Stable Diffusion ``.ckpt``/``.safetensors`` and (optionally) its original inference YAML;
        see :func:`ldm.interop.single_file.load_single_file`."""
        from ldm.interop.single_file import load_single_file

        return load_single_file(path, config, parameterization, use_ema, map_location)

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None, extra_metadata: Mapping[str, Any] | None = None) -> None:
        """Atomically write all weights (SD key layout) and the full config to ``path``."""
        if self.config is None:
            raise ValueError("this model was built without a config; build it with LatentDiffusion.from_config")
        metadata = {"scale_factor": self.scale_factor, "parameterization": self.parameterization, **(extra_metadata or {})}
        save_safetensors(path, self.state_dict(), config=self.config, metadata=metadata, dtype=dtype)

    # ---------------------------------------------------------------- the three parts
    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Pixels ``[B,3,H,W]`` in [-1, 1] -> scaled latents ``[B,C,H/f,W/f]``: ``z = scale_factor * E(x)``."""
        posterior = self.first_stage_model.encode(images)
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return z * self.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1] (unclamped): ``x = D(z / scale_factor)``."""
        decoder_dtype = next(self.first_stage_model.parameters()).dtype
        return self.first_stage_model.decode(latents.to(decoder_dtype) / self.scale_factor)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> context ``[B, L, D]``."""
        return self.cond_stage_model.encode(list(prompts))

    def empty_context(self, batch_size: int) -> torch.Tensor:
        """The empty prompt's context: the unconditional branch of guidance. Computed once for a frozen text
        encoder; a trainable one changes under training (and under EMA swaps), so it is recomputed."""
        trainable = any(p.requires_grad for p in self.cond_stage_model.parameters())
        if trainable or self._empty_context is None or self._empty_context.device != self.device:
            with torch.no_grad():
                context = self.encode_text([""])
            self._empty_context = None if trainable else context
        else:
            context = self._empty_context
        return context.expand(batch_size, -1, -1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def model_fn(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The denoiser in the samplers' signature: ``model_fn(x_t, t, cond) -> output``."""
        return self.model(x_t, t, context)

    # ---------------------------------------------------------------- sampling
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the autoencoder's downsampling factor times the UNet's."""
        return self.first_stage_model.downsampling_factor * 2 ** (len(self.unet.channel_mult) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Latent ``(C, h, w)`` for an image size; ``ValueError`` (giving the one multiple that works) when the
        autoencoder or UNet cannot take it."""
        multiple = self.size_multiple()
        if height < 1 or width < 1 or height % multiple or width % multiple:
            unet_factor = multiple // self.first_stage_model.downsampling_factor
            raise ValueError(
                f"{height}x{width} cannot be generated by this model: height and width must be multiples of "
                f"{multiple} (the autoencoder downsamples by {self.first_stage_model.downsampling_factor}, "
                f"the UNet by {unet_factor})"
            )
        return self.first_stage_model.latent_shape(height, width)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        sampler: Any,
        guidance_scale: float | None = 5.0,
        height: int = 64,
        width: int = 64,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        progress: bool = True,
        callback: Callable | None = None,
        decode: bool = True,
        context: torch.Tensor | None = None,
        first_step: int = 0,
        guide: Callable | None = None,
        concat: torch.Tensor | None = None,
        last_step: int | None = None,
    ) -> torch.Tensor:
        """Text -> images ``[B,3,H,W]``, decoded and not clamped (the decoder's output is close to [-1, 1] but may
        overshoot it slightly; clamp before saving), or latents when ``decode=False``.

        ``sampler`` is an object with the shared ``.sample(model_fn, x_T, cond, generator, progress, callback)``
        signature, or a config node / name understood by :func:`ldm.diffusion.build_sampler`.
        Guidance: ``eps = eps(x, t, "") + s * (eps(x, t, prompt) - eps(x, t, ""))`` in one batched call.
        ``generator``: one generator, or one per prompt (each image's noise from its own stream). ``first_step``,
        ``guide``: see :meth:`Sampler.sample`; ``concat [B, k, h, w]``: extra UNet input channels (inpainting UNets).
        """
        if isinstance(sampler, (str, Mapping)):
            sampler = self.build_sampler(sampler)
        device = self.device
        batch = len(prompts)
        if context is None:
            context = self.encode_text(prompts)
        context = context.to(device)
        if x_T is None:
            x_T = randn((batch, *self.latent_shape(height, width)), generator, device)  # one stream, or one per image
        x_T = x_T.to(device=device, dtype=next(self.unet.parameters()).dtype)
        base_fn = self.model_fn
        if concat is not None:  # a 9-channel inpainting UNet also sees the mask and the masked image's latents
            from ldm.inpainting import concat_conditioning

            base_fn = concat_conditioning(self.model_fn, concat.to(device))
        if guidance_scale is None or guidance_scale == 1.0:
            model_fn, cond = base_fn, context
        else:
            model_fn = classifier_free_guidance(base_fn, guidance_scale)
            cond = (context, self.empty_context(batch).to(context.dtype))
        latents = sampler.sample(model_fn, x_T, cond=cond, generator=generator, progress=progress, callback=callback,
                                 first_step=first_step, guide=guide, last_step=last_step)
        return self.decode_latents(latents) if decode else latents

    def _check_edit(self, images: torch.Tensor, prompts: Sequence[str], sampler: Any) -> tuple[Any, tuple]:
        """``(sampler, latent shape)`` for editing ``images [len(prompts), 3, H, W]``; ``ValueError`` otherwise."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise ValueError(f"images must be [len(prompts)={len(prompts)}, 3, H, W], got {tuple(images.shape)}")
        shape = self.latent_shape(images.shape[2], images.shape[3])  # a size the model can take, or the multiple
        return (self.build_sampler(sampler) if isinstance(sampler, (str, Mapping)) else sampler), shape

    @torch.no_grad()
    def img2img(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        sampler: Any,
        strength: float,
        guidance_scale: float | None = 5.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        progress: bool = True,
        decode: bool = True,
    ) -> torch.Tensor:
        """SDEdit: images ``[B,3,H,W]`` in [-1, 1] -> edited images (or latents when ``decode=False``).

        The image is encoded (posterior mean), noised to the sampler's own grid and sampled from there: of ``n``
        steps the last ``k = round(strength * n)`` are run, from ``x = sqrt(abar) z0 + sqrt(1 - abar) noise`` at the
        noise level entering step ``n - k`` (SD's img2img and diffusers count steps the same way). The ends are
        exact: ``k = 0`` returns the autoencoder's reconstruction of the image, ``k = n`` starts from pure noise and is
        txt2img. ``generator``: one per image gives each image its own noise stream (the noise here is its first
        draw, as txt2img's starting noise).
        """
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        sampler, _ = self._check_edit(images, prompts, sampler)
        z0 = self.encode_images(images.to(self.device, next(self.first_stage_model.parameters()).dtype), sample=False)
        steps = sampler.num_steps
        run = int(round(float(strength) * steps))
        if run == 0:
            return self.decode_latents(z0) if decode else z0
        noise = randn(z0.shape, generator, z0.device)
        first = steps - run
        if first == 0:
            x = noise  # all steps: txt2img's start, the image is not used
        else:
            abar = float(sampler.input_alpha_cumprod(first))
            x = abar ** 0.5 * z0 + (1 - abar) ** 0.5 * noise
        return self.sample(prompts, sampler, guidance_scale=guidance_scale, x_T=x, generator=generator,
                           progress=progress, decode=decode, first_step=first)

    @torch.no_grad()
    def inpaint(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        prompts: Sequence[str],
        sampler: Any,
        guidance_scale: float | None = 5.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        known_generators: Sequence[torch.Generator] | None = None,
        progress: bool = True,
        callback: Callable | None = None,
        jumps: int = 0,
    ) -> torch.Tensor:
        """Repaint ``images [B,3,H,W]`` (in [-1, 1]) where ``masks [B,1,H,W]`` is 1; returns pixels ``[B,3,H,W]``.

        A 9-channel inpainting model (``config["inpainting"]``, SD's inpainting checkpoints) conditions on the mask
        and the masked image; any other model gets the known region put back at every step
        (:mod:`ldm.inpainting`). The known pixels are pasted back through a feathered mask after decoding.
        ``generator``: the samplers' noise, one per image for per-image streams; ``known_generators``: the known
        region's noise (one per image; :func:`ldm.inpainting.known_region_generators`). ``jumps`` (any model but
        the 9-channel ones): RePaint's resampling, each step redone ``jumps`` more times after going back to its
        noise level (:func:`ldm.inpainting.renoise`), so the repainted region agrees with the kept one.
        """
        from ldm.inpainting import feathered, known_region_guide, latent_mask, prepare_mask

        sampler, shape = self._check_edit(images, prompts, sampler)
        masks = prepare_mask(masks, tuple(images.shape[-2:])).to(images)
        dtype = next(self.first_stage_model.parameters()).dtype
        images_in = images.to(self.device, dtype)
        z0 = self.encode_images(images_in, sample=False)
        x_T = randn((len(prompts), *shape), generator)
        common = dict(guidance_scale=guidance_scale, x_T=x_T, generator=generator, progress=progress,
                      callback=callback, decode=False)
        if self.config and self.config.get("inpainting"):
            small = torch.nn.functional.interpolate(masks, size=z0.shape[-2:], mode="nearest").to(z0)
            masked = self.encode_images(images_in * (1 - masks.to(images_in)), sample=False)
            latents = self.sample(prompts, sampler, concat=torch.cat([small, masked], dim=1), **common)
        else:
            cells = latent_mask(masks, tuple(z0.shape[-2:])).to(z0)
            guide = known_region_guide(z0, cells, sampler, known_generators)
            if jumps:
                latents = self._resampled(prompts, sampler, guide, jumps, known_generators, common)
            else:
                latents = self.sample(prompts, sampler, guide=guide, **common)
            latents = cells * latents + (1 - cells) * z0
        pixels = self.decode_latents(latents).float().cpu()
        weight = feathered(masks.float().cpu())
        return weight * pixels + (1 - weight) * images.float().cpu()

    def _resampled(self, prompts, sampler, guide, jumps: int, generators, common: dict) -> torch.Tensor:
        """RePaint's loop: step by step, each step taken ``jumps + 1`` times, going back to its noise level between."""
        from ldm.inpainting import renoise

        if jumps < 0:
            raise ValueError(f"jumps must be >= 0, got {jumps}")
        common = dict(common)
        x = common.pop("x_T")
        common["context"] = self.encode_text(prompts)
        common["progress"] = False
        for index in range(sampler.num_steps):
            for jump in range(jumps + 1):
                x_next = self.sample(prompts, sampler, x_T=x, first_step=index, last_step=index + 1, guide=guide,
                                     **common)
                if jump < jumps and index + 1 < sampler.num_steps:
                    x = renoise(x_next, float(sampler.input_alpha_cumprod(index + 1)),
                                float(sampler.input_alpha_cumprod(index)), generators)
            x = x_next
        return x

    def build_sampler(self, spec: str | Mapping[str, Any], **overrides: Any) -> Any:
        """A sampler for this model's schedule and parameterization from a name or ``{name, ...}`` mapping."""
        if isinstance(spec, str):
            spec = {"name": spec}
        spec = dict(to_container(spec))
        name = spec.pop("name")
        spec = {**self.sampler_defaults.get(name, {}), **spec, **overrides}
        spec.setdefault("parameterization", self.parameterization)
        return build_sampler(name, self.schedule, **spec)

