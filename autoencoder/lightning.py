"""Lightning wrapper that trains an ``AutoencoderKL`` with ``LPIPSWithDiscriminator`` (manual optimization).

Lightning 2 has no ``optimizer_idx``; each training step does, by hand:

1. autoencoder step: ``loss = nll + kl_weight * kl (+ lambda * g_loss once the discriminator is on)``, Adam;
2. discriminator step (from ``disc_start`` on): hinge/vanilla loss on ``x`` vs ``x_rec.detach()``, Adam.

``trainer.global_step`` counts training batches: only the autoencoder optimizer's step is counted (Lightning
would otherwise count both optimizers' steps under manual optimization and ``max_steps``/``disc_start``
would mean half as many batches).

Recipe (CompVis kl-f8): ``learning_rate = 4.5e-6 * batch_size`` (CompVis scales its base rate by the batch size
and GPU count), Adam betas (0.5, 0.9) for both optimizers, ``kl_weight=1e-6``, ``disc_start=50001``,
``disc_weight=0.5``. ``learn_logvar`` adds the loss's scalar log-variance to the autoencoder optimizer
(the LDM paper's learned NLL scale; CompVis' v1 code left it fixed at ``logvar_init``, i.e. ``learn_logvar=False``).

``ema_decay`` (SD's option) keeps an exponential moving average of the autoencoder weights,
``ema <- ema + (1 - d) * (w - ema)`` with ``d = min(ema_decay, (1 + n) / (10 + n))`` after the n-th update
(LitEma's warm-up); validation, image logging and the exported weights then use the average
(``inference_autoencoder()``).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Sequence

import pytorch_lightning as pl
import torch

from autoencoder.autoencoder_kl import AutoencoderKL
from autoencoder.metrics import psnr
from ldm.training import check_finite, set_base_learning_rate
from ldm.util import instantiate_from_config, to_container

_PERCEPTUAL_PREFIX = "loss.perceptual_loss."


class AutoencoderKLTraining(pl.LightningModule):
    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        lossconfig: Mapping[str, Any],
        learning_rate: float = 4.5e-6,
        adam_betas: Sequence[float] = (0.5, 0.9),
        learn_logvar: bool = True,
        image_key: str = "image",
        monitor: str | None = None,
        ckpt_path: str | None = None,
        ignore_keys: Iterable[str] = (),
        colorize_nlabels: int | None = None,
        ema_decay: float | None = None,
        accumulate_grad_batches: int = 1,
    ):
        """
        Args:
            ddconfig, embed_dim, ckpt_path, ignore_keys, colorize_nlabels: passed to ``AutoencoderKL``.
            lossconfig: ``{target, params}`` of the loss, normally ``autoencoder.losses.LPIPSWithDiscriminator``.
            learning_rate: Adam learning rate of both optimizers (already scaled; see the module docstring).
            adam_betas: Adam betas (SD: (0.5, 0.9)).
            learn_logvar: optimize the loss's log-variance together with the autoencoder.
            image_key: batch dict key of the images ``[B, C, H, W]`` in [-1, 1].
            monitor: metric name kept for SD config compatibility (e.g. ``val/rec_loss``).
            ema_decay: keep an EMA of the autoencoder weights (see the module docstring); ``None``: no EMA.
            accumulate_grad_batches: micro-batches per optimizer step (``lightning.accumulate_grad_batches``; the
                training script sets it). Manual optimization accumulates here: each micro-batch's losses are
                divided by it, and both optimizers step after the last micro-batch of the window, the
                discriminator on the gradients of exactly the micro-batches the autoencoder stepped on.
        """
        super().__init__()
        if lossconfig is None:
            raise ValueError("lossconfig is required (e.g. target: autoencoder.losses.LPIPSWithDiscriminator)")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.automatic_optimization = False
        self.autoencoder = AutoencoderKL(
            ddconfig, embed_dim, ckpt_path=ckpt_path, ignore_keys=ignore_keys, image_key=image_key,
            colorize_nlabels=colorize_nlabels, monitor=monitor,
        )
        self.loss = instantiate_from_config(lossconfig, path="model.params.lossconfig")
        self.learning_rate = float(learning_rate)
        self.adam_betas = tuple(float(b) for b in to_container(adam_betas))
        self.learn_logvar = learn_logvar
        self.image_key = image_key
        self.monitor = monitor
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        if int(accumulate_grad_batches) < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self._micro_batch = 0  # position in the accumulation window; 0 at every checkpoint (they follow a step)
        if ema_decay is not None:
            self.autoencoder_ema = copy.deepcopy(self.autoencoder).requires_grad_(False)
            self.register_buffer("ema_num_updates", torch.tensor(0, dtype=torch.long))

    # ------------------------------------------------------------------------------------ helpers

    def get_input(self, batch: Any) -> torch.Tensor:
        x = batch[self.image_key] if isinstance(batch, Mapping) else batch
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(
                f"batch[{self.image_key!r}] must be an image tensor [B, C, H, W], got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        return x.to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self) -> torch.Tensor:
        return self.autoencoder.get_last_layer()

    def inference_autoencoder(self) -> AutoencoderKL:
        """The weights to evaluate and export: the EMA copy when ``ema_decay`` is set, else the trained module."""
        return self.autoencoder_ema if self.ema_decay is not None else self.autoencoder

    @torch.no_grad()
    def update_ema(self) -> None:
        n = int(self.ema_num_updates) + 1
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        for ema_p, p in zip(self.autoencoder_ema.parameters(), self.autoencoder.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.autoencoder_ema.buffers(), self.autoencoder.buffers()):
            ema_b.copy_(b)
        self.ema_num_updates.fill_(n)

    def _optimizers(self):
        optimizers = self.optimizers()
        if isinstance(optimizers, (list, tuple)):
            return optimizers[0], (optimizers[1] if len(optimizers) > 1 else None)
        return optimizers, None

    def _step_uncounted(self, optimizer) -> None:
        """Step ``optimizer`` through the strategy/precision plugin without advancing ``global_step``."""
        self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    # ------------------------------------------------------------------------------------ Lightning hooks

    def configure_optimizers(self):
        ae_params = list(self.autoencoder.parameters())
        if self.learn_logvar:
            ae_params.append(self.loss.logvar)
        opt_ae = torch.optim.Adam(ae_params, lr=self.learning_rate, betas=self.adam_betas)
        if getattr(self.loss, "discriminator", None) is None:
            return opt_ae
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=self.learning_rate, betas=self.adam_betas)
        return [opt_ae, opt_disc]

    def on_train_start(self) -> None:
        set_base_learning_rate(self.trainer, self.learning_rate)  # a learning rate changed on --resume applies
        self._micro_batch = 0

    def training_step(self, batch, batch_idx):
        opt_ae, opt_disc = self._optimizers()
        step = self.global_step
        window = self.accumulate_grad_batches
        disc_on = opt_disc is not None and self.loss.discriminator_active(step)
        if self._micro_batch == 0:
            opt_ae.zero_grad(set_to_none=True)
            if opt_disc is not None:
                opt_disc.zero_grad(set_to_none=True)
        x = self.get_input(batch)

        # The generator loss runs through the discriminator: toggling keeps its gradient out of the discriminator's,
        # which accumulate over the window beside the autoencoder's.
        self.toggle_optimizer(opt_ae)
        reconstructions, posterior = self.autoencoder(x)
        ae_loss, log_ae = self.loss(
            x, reconstructions, posterior, 0, step, last_layer=self.get_last_layer(), split="train"
        )
        check_finite(ae_loss, step, "autoencoder loss")
        self.manual_backward(ae_loss / window)
        self.untoggle_optimizer(opt_ae)
        logs = dict(log_ae)

        if disc_on:
            self.toggle_optimizer(opt_disc)
            d_loss, log_disc = self.loss(
                x, reconstructions.detach(), posterior, 1, step, last_layer=self.get_last_layer(), split="train"
            )
            check_finite(d_loss, step, "discriminator loss")
            self.manual_backward(d_loss / window)
            self.untoggle_optimizer(opt_disc)
            logs.update(log_disc)

        self._micro_batch = (self._micro_batch + 1) % window
        if self._micro_batch == 0:  # the window's last micro-batch: one step of each optimizer
            opt_ae.step()
            if self.ema_decay is not None:
                self.update_ema()
            if disc_on:
                self._step_uncounted(opt_disc)

        batch_size = x.shape[0]
        self.log("train/loss", ae_loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/rec", log_ae["train/rec_loss"], prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=batch_size)
        self.log_dict({k: v.float() for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=batch_size)
        return ae_loss.detach()

    def validation_step(self, batch, batch_idx):
        x = self.get_input(batch)
        reconstructions, posterior = self.inference_autoencoder()(x, sample_posterior=False)
        _, log_ae = self.loss(x, reconstructions, posterior, 0, self.global_step, split="val")
        log_ae["val/psnr"] = psnr(x, reconstructions).mean()
        batch_size = x.shape[0]
        # sync_dist: with several processes each validates its share, the logged value is the mean over ranks
        self.log("val/rec_loss", log_ae["val/rec_loss"], prog_bar=True, on_epoch=True, batch_size=batch_size,
                 sync_dist=True)
        self.log("val/psnr", log_ae["val/psnr"], prog_bar=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        self.log_dict({k: v.float() for k, v in log_ae.items() if k not in ("val/rec_loss", "val/psnr")},
                      on_epoch=True, batch_size=batch_size, sync_dist=True)

    @torch.no_grad()
    def log_images(self, batch, max_images: int = 8) -> dict[str, Any]:
        """``{"reconstruction": [inputs, reconstructions]}``: inputs over their reconstructions (posterior mode, EMA
        weights when kept)."""
        x = self.get_input(batch)[:max_images].to(self.device)
        reconstructions, _ = self.inference_autoencoder()(x, sample_posterior=False)
        return {"reconstruction": [x, reconstructions.clamp(-1, 1)]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # LPIPS is frozen and rebuilt from its own files: keep its ~60 MB out of every checkpoint
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(_PERCEPTUAL_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is None:
            return
        for key, value in self.state_dict().items():
            if key.startswith(_PERCEPTUAL_PREFIX) and key not in state:
                state[key] = value
