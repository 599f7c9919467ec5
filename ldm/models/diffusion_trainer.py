"""Lightning module that trains the UNet of a :class:`LatentDiffusion`, and optionally its text encoder
(``cond_stage_trainable``, as in CompVis' LatentDiffusion); the autoencoder stays frozen.

Per step (DDPM Algorithm 1 on latents): ``z0 = scale * E(x)``, captions dropped to ``""`` with probability
``p_uncond`` (this trains the unconditional branch used by classifier-free guidance), ``t ~ U{0..T-1}`` (or a
density that oversamples the high-noise steps: ``high_noise_prob``), loss ``||target - unet(z_t, t, c)||^2``
with target eps, x0 or v. EMA weights of the UNet (and of a trained text encoder) are kept beside the raw ones;
they are what sampling and export use.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch

from ldm.diffusion import diffusion_loss, high_noise_timestep_density, sample_timesteps
from ldm.data.latent_memo import LatentMemo
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.inpainting import concat_conditioning, random_masks
from ldm.modules.ema import EMA
from ldm.distributed import rank_seed
from ldm.resume import gather_from_ranks
from ldm.training import set_base_learning_rate


LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(schedule: str) -> str:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    return schedule


def warmup_lr_factor(step: int, warmup_steps: int, schedule: str = "constant", total_steps: int | None = None,
                     min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps``, then ``constant`` (1) or
    ``cosine``: ``min + (1 - min) * (1 + cos(pi * p)) / 2`` with ``p = (step - warmup) / (total - warmup)``
    clipped to [0, 1], so the rate reaches ``min_factor`` at ``total_steps`` and stays there.
    """
    warmup = max(1, int(warmup_steps))
    if step < warmup:
        return (step + 1) / warmup
    if check_lr_schedule(schedule) == "constant":
        return 1.0
    if not total_steps or total_steps < 1:
        raise ValueError(f"lr_schedule 'cosine' needs the total number of steps, got {total_steps}")
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def posterior_latents(mean: torch.Tensor, std: torch.Tensor, scale_factor: float, sample: bool,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Cached posterior moments ``mean, std [B,C,h,w]`` -> scaled latents ``z0 [B,C,h,w]``.

    ``sample``: ``z0 = scale_factor * (mean + std * eps)``, ``eps ~ N(0, I)`` drawn as
    ``DiagonalGaussianDistribution.sample`` draws it (same shape, dtype and stream), so under the same seed this is
    ``model.encode_images(images, sample=True)``; else the posterior mode ``scale_factor * mean``."""
    if not sample:
        return mean * scale_factor
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale_factor


def with_empty_prompt(context: torch.Tensor, dropped: Sequence[bool], empty: torch.Tensor) -> torch.Tensor:
    """``context [B,L,D]`` with row ``i`` replaced by ``empty [1,L,D]`` (the empty prompt's context) where
    ``dropped[i]``: caption dropout applied to cached contexts."""
    mask = torch.tensor(list(dropped), dtype=torch.bool, device=context.device).view(-1, 1, 1)
    return torch.where(mask, empty.to(context), context)


class DiffusionTrainer(pl.LightningModule):
    """Args:
        model: the :class:`LatentDiffusion` to train (``model.unet`` gets gradients, the autoencoder never).
        cond_stage_trainable: also train the text encoder (it must be built unfrozen: ``text_encoder.params.freeze:
            false``). Worth it when the encoder is not pretrained: a frozen random tower barely encodes which
            attribute words belong to which object.
        cond_stage_lr_factor: the text encoder's learning rate as a fraction of ``learning_rate`` (its own AdamW
            param group, on the same warm-up and schedule), like sd-scripts' separate ``text_encoder_lr``.
        learning_rate, weight_decay, betas: AdamW settings; ``warmup_steps`` of linear warm-up.
        lr_schedule: after warm-up, ``constant`` or ``cosine`` decay to ``lr_min_factor * learning_rate`` at the
            trainer's ``max_steps`` (:func:`warmup_lr_factor`).
        p_uncond: probability of replacing a caption with the empty prompt.
        min_snr_gamma: optional min-SNR-gamma loss weighting (Hang et al. 2023).
        high_noise_prob, high_noise_from: draw a training ``t`` from ``{high_noise_from .. T-1}`` with probability
            ``high_noise_prob``, else uniformly (:func:`ldm.diffusion.high_noise_timestep_density`); 0 is DDPM's
            uniform draw. Validation always draws uniformly.
        ema_decay: EMA decay (``None`` disables EMA).
        image_key, caption_key: batch keys.
        sample_prompts: prompts for the grid sampled every ``sample_every`` steps (by the image callback).
        sampler: sampler spec (name or mapping) for those grids; ``guidance_scale`` for them.
        latent_memo: keep the frozen autoencoder's posterior of up to this many distinct images in memory
            (:class:`ldm.data.latent_memo.LatentMemo`) and encode only images not seen before; pays when images
            repeat (a procedural set, a small folder over many epochs). ``None``: encode every image every step.
        compile_unet: run the training forward and backward through ``torch.compile`` of the UNet (``true``, or a
            mapping of ``torch.compile`` keyword arguments such as ``{mode: max-autotune}``). Sampling, validation
            and the saved weights use the plain module, so checkpoint keys do not change. Costs a compile at the
            first step (162 s cold on 2 CPU cores) for 3-5% of the demo's UNet step there (README, "make demo").
    """

    def __init__(
        self,
        model: LatentDiffusion,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 1000,
        lr_schedule: str = "constant",
        lr_min_factor: float = 0.0,
        p_uncond: float = 0.1,
        min_snr_gamma: float | None = None,
        high_noise_prob: float = 0.0,
        high_noise_from: int | None = None,
        ema_decay: float | None = 0.9999,
        image_key: str = "image",
        caption_key: str = "caption",
        sample_prompts: Sequence[str] = ("a red circle",),
        sampler: Any = "ddim",
        guidance_scale: float = 5.0,
        sample_height: int = 64,
        sample_width: int = 64,
        cond_stage_trainable: bool = False,
        cond_stage_lr_factor: float = 1.0,
        latent_memo: int | None = None,
        compile_unet: bool | Mapping[str, Any] = False,
    ):
        super().__init__()
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        if cond_stage_trainable and not any(p.requires_grad for p in model.cond_stage_model.parameters()):
            raise ValueError(
                "cond_stage_trainable is set but the text encoder has no trainable parameters: build it with "
                "model.text_encoder.params.freeze: false"
            )
        if not cond_stage_lr_factor > 0:
            raise ValueError(f"cond_stage_lr_factor must be > 0, got {cond_stage_lr_factor}")
        if cond_stage_lr_factor != 1.0 and not cond_stage_trainable:
            raise ValueError("cond_stage_lr_factor applies to a trained text encoder: set cond_stage_trainable: true")
        if high_noise_prob and high_noise_from is None:
            raise ValueError("high_noise_prob > 0 needs high_noise_from, the first timestep of the oversampled band")
        self.timestep_density = (
            high_noise_timestep_density(model.schedule.num_timesteps, high_noise_from, high_noise_prob)
            if high_noise_prob
            else None
        )
        self.model = model
        self.cond_stage_trainable = bool(cond_stage_trainable)
        self.cond_stage_lr_factor = float(cond_stage_lr_factor)
        # Averages the wrapper, not the bare UNet, so EMA keys read model_ema.diffusion_model* as in SD checkpoints.
        self.model_ema = EMA(model.model, decay=ema_decay) if ema_decay is not None else None
        self.cond_stage_ema = (
            EMA(model.cond_stage_model, decay=ema_decay) if ema_decay is not None and self.cond_stage_trainable else None
        )
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.lr_schedule = check_lr_schedule(lr_schedule)  # at construction, not at the first step after warm-up
        self.lr_min_factor = lr_min_factor
        self.p_uncond = p_uncond
        self.min_snr_gamma = min_snr_gamma
        self.image_key = image_key
        self.caption_key = caption_key
        if isinstance(sample_prompts, str) or not all(isinstance(p, str) and p for p in sample_prompts):
            raise ValueError(f"sample_prompts must be a list of non-empty strings, got {sample_prompts!r}")
        self.sample_prompts = list(sample_prompts)
        # Checked now, not at the first image grid hundreds of steps in: a bad name or size would lose that work.
        model.build_sampler(sampler)
        model.latent_shape(sample_height, sample_width)
        self.sampler_spec = sampler
        self.guidance_scale = guidance_scale
        self.sample_size = (sample_height, sample_width)
        self._caption_rng = random.Random(0)
        # a 9-channel UNet (model config "inpainting"): trained on random masks, sampled by inpainting
        self.inpainting = bool((model.config or {}).get("inpainting"))
        self.latent_memo = LatentMemo(latent_memo) if latent_memo else None
        if not isinstance(compile_unet, (bool, Mapping)):
            raise ValueError(f"compile_unet must be true, false or a mapping of torch.compile arguments, got "
                             f"{compile_unet!r}")
        # None: eager; else torch.compile's keyword arguments
        self.compile_options = (
            dict(compile_unet) if isinstance(compile_unet, Mapping) else ({} if compile_unet else None)
        )
        self._compiled_model = None

    def training_model_fn(self):
        """The denoiser for training steps: ``model.model_fn``, through ``torch.compile`` when ``compile_unet``.
        The compiled wrapper is held outside the module tree (no ``_orig_mod.`` keys in checkpoints)."""
        if self.compile_options is None:
            return self.model.model_fn
        if self._compiled_model is None:
            object.__setattr__(self, "_compiled_model", torch.compile(self.model.model, **self.compile_options))
        return self._compiled_model

    # ---------------------------------------------------------------- data
    def _unpack(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor | None, list[str]]:
        """``(images [B,3,H,W], captions)``; ``images`` is ``None`` for a latent-cache batch, which holds the
        posterior's ``latent_mean`` and ``latent_std`` ``[B,C,h,w]`` instead (:mod:`ldm.data.latent_cache`)."""
        from ldm.data.latent_cache import LATENT_MEAN, LATENT_STD

        cached = self.image_key not in batch and (LATENT_MEAN in batch or LATENT_STD in batch)
        needed = (LATENT_MEAN, LATENT_STD, self.caption_key) if cached else (self.image_key, self.caption_key)
        missing = [key for key in needed if key not in batch]
        if missing:
            raise KeyError(
                f"batch has no {missing} key(s) (configured image_key={self.image_key!r}, "
                f"caption_key={self.caption_key!r}; a latent-cache batch holds {LATENT_MEAN!r} and "
                f"{LATENT_STD!r} instead of images); the batch has keys {sorted(batch)}"
            )
        images, captions = (None if cached else batch[self.image_key]), batch[self.caption_key]
        if isinstance(captions, str):
            captions = [captions]
        return images, list(captions)

    def drop_captions(self, captions: list[str]) -> list[str]:
        """Replace each caption with ``""`` with probability ``p_uncond`` (classifier-free guidance training)."""
        return ["" if self._caption_rng.random() < self.p_uncond else caption for caption in captions]

    # ---------------------------------------------------------------- training
    def batch_loss(self, batch: Mapping[str, Any], training: bool, generator: torch.Generator | None = None):
        """``(loss, batch size)``. Training: posterior samples, caption dropout, the configured timestep density and
        min-SNR weighting. Validation: posterior means, every caption, uniform ``t``, the plain unweighted loss
        (comparable across configs). A latent-cache batch gives the posterior (:func:`posterior_latents`) and, for a
        frozen text encoder, the context (dropped rows: the empty prompt's) without running either encoder."""
        from ldm.data.latent_cache import CONTEXT, LATENT_MEAN, LATENT_STD

        images, captions = self._unpack(batch)
        if images is None:  # a latent-cache batch: the posterior is cached, the autoencoder does not run
            if self.inpainting:
                raise ValueError(
                    "an inpainting model (9-channel UNet) trains on random masks over the pixels, which a latent "
                    "cache does not hold: train it on images (an image folder or shards as --data)"
                )
            dtype = next(self.model.first_stage_model.parameters()).dtype  # what encode_images would return
            latents = posterior_latents(batch[LATENT_MEAN].to(dtype), batch[LATENT_STD].to(dtype),
                                        self.model.scale_factor, sample=training)
        elif self.latent_memo is not None:
            mean, std = self.latent_memo(images, self.model.first_stage_model.encode)
            latents = posterior_latents(mean, std, self.model.scale_factor, sample=training)
        else:
            latents = self.model.encode_images(images, sample=training)
        model_fn = self.training_model_fn() if training else self.model.model_fn
        if self.inpainting:  # the UNet also sees a random mask and the masked image's latents (SD's recipe)
            masks = random_masks(images.shape[0], images.shape[2], images.shape[3], generator).to(images)
            small = torch.nn.functional.interpolate(masks, size=latents.shape[-2:], mode="nearest")
            masked = self.model.encode_images(images * (1 - masks), sample=False)
            model_fn = concat_conditioning(self.model.model_fn, torch.cat([small, masked], dim=1))
        # a frozen text encoder's cached output is what it would compute now; a trained one changes every step
        if CONTEXT in batch and not self.cond_stage_trainable:
            context = batch[CONTEXT].to(next(self.model.cond_stage_model.parameters()).dtype)
            if training:  # the same dropout draws as below; a dropped row gets the empty prompt's context
                dropped = [caption == "" for caption in self.drop_captions(captions)]
                if any(dropped):
                    context = with_empty_prompt(context, dropped, self.model.empty_context(1))
        else:
            with torch.set_grad_enabled(training and self.cond_stage_trainable and torch.is_grad_enabled()):
                context = self.model.encode_text(self.drop_captions(captions) if training else captions)
        t = None
        if training and self.timestep_density is not None:
            t = sample_timesteps(len(latents), self.model.schedule.num_timesteps, latents.device, generator,
                                 self.timestep_density)
        loss = diffusion_loss(
            model_fn,
            self.model.schedule,
            latents,
            cond=context,
            parameterization=self.model.parameterization,
            min_snr_gamma=self.min_snr_gamma if training else None,
            t=t,
            generator=generator,
        )
        return loss, len(captions)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, batch_size = self.batch_loss(batch, training=True)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch_size)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=False, batch_size=batch_size)
        if self.latent_memo is not None:
            self.log("train/latent_memo_hit_rate", self.latent_memo.hit_rate, on_step=True, batch_size=batch_size)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: Lightning runs the checkpoint callback's hook before the
        # module's, so an EMA update there would be missing from the checkpoint saved at that step.
        if self.model_ema is not None:
            self.model_ema.update(self.model.model)
        if self.cond_stage_ema is not None:
            self.cond_stage_ema.update(self.model.cond_stage_model)

    def on_train_start(self) -> None:
        set_base_learning_rate(self.trainer, self.learning_rate)

    def setup(self, stage: str) -> None:
        if self.trainer.global_rank:  # each rank drops its own captions; rank 0 keeps the one-process stream
            self._caption_rng.seed(rank_seed(0, self.trainer.global_rank))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        version, state, gauss_next = self._caption_rng.getstate()
        mine = {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss_next": gauss_next}
        checkpoint["caption_rng"] = gather_from_ranks(mine, self.trainer)  # one per rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("caption_rng")
        if not saved:
            return
        saved = [saved] if isinstance(saved, dict) else list(saved)  # a dict: written before per-rank states
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        state = saved[rank] if len(saved) == world else saved[0]
        self._caption_rng.setstate((state["version"], tuple(state["state"].tolist()), state["gauss_next"]))
        if len(saved) != world and rank:  # N -> M processes: rank 0's stream, made this rank's own
            self._caption_rng.seed(rank_seed(self._caption_rng.getrandbits(32), rank))

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)  # the same t and noise each time
        with self.ema_weights():
            loss, batch_size = self.batch_loss(batch, training=False, generator=generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)  # the mean over ranks
        return loss

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The UNet's parameters, and the text encoder's trainable ones when ``cond_stage_trainable``."""
        return list(self.model.unet.parameters()) + self._cond_stage_trainable_parameters()

    def _cond_stage_trainable_parameters(self) -> list[torch.nn.Parameter]:
        if not self.cond_stage_trainable:
            return []
        return [p for p in self.model.cond_stage_model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if self.cond_stage_lr_factor != 1.0:  # a second group only then: one-group checkpoints still resume
            params = [
                {"params": list(self.model.unet.parameters())},
                {"params": self._cond_stage_trainable_parameters(), "lr_factor": self.cond_stage_lr_factor,
                 "lr": self.learning_rate * self.cond_stage_lr_factor},
            ]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay, betas=self.betas)
        total_steps = self.trainer.max_steps if self.lr_schedule == "cosine" else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_lr_factor(step, self.warmup_steps, self.lr_schedule, total_steps, self.lr_min_factor),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- EMA and images
    @contextlib.contextmanager
    def ema_weights(self):
        """Context manager: the UNet (and a trained text encoder) run with EMA weights inside, raw weights are
        restored after."""
        with contextlib.ExitStack() as stack:
            if self.model_ema is not None:
                stack.enter_context(self.model_ema.average_parameters(self.model.model))
            if self.cond_stage_ema is not None:
                stack.enter_context(self.cond_stage_ema.average_parameters(self.model.cond_stage_model))
            yield

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any] | None = None, max_images: int | None = None) -> dict[str, torch.Tensor]:
        """Samples for the fixed prompts with the EMA weights: ``{"samples": [N,3,H,W]}`` in [-1, 1].

        The same starting noise every time (seed 0), so grids from successive steps are comparable.
        """
        generator = torch.Generator(device="cpu").manual_seed(0)
        height, width = self.sample_size
        was_training = self.model.training
        self.model.eval()
        if self.inpainting and batch is not None:  # inputs over their right halves repainted from their captions
            images, captions = self._unpack(batch)
            images, captions = images[:max_images], captions[:max_images]
            masks = torch.zeros(images.shape[0], 1, *images.shape[2:])
            masks[..., images.shape[-1] // 2:] = 1
            try:
                with self.ema_weights():
                    out = self.model.inpaint(images, masks.to(images), captions, self.model.build_sampler(
                        self.sampler_spec), guidance_scale=self.guidance_scale, generator=generator, progress=False)
            finally:
                self.model.train(was_training)
            return {"inpaint": [images.float().cpu().clamp(-1, 1), out.clamp(-1, 1)]}
        try:
            with self.ema_weights():
                samples = self.model.sample(
                    self.sample_prompts[:max_images] if max_images else self.sample_prompts,
                    self.model.build_sampler(self.sampler_spec),
                    guidance_scale=self.guidance_scale,
                    height=height,
                    width=width,
                    generator=generator,
                    progress=False,
                )
        finally:
            self.model.train(was_training)
        return {"samples": samples.clamp(-1, 1)}

