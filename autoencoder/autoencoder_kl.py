"""``AutoencoderKL``: Stable Diffusion's first stage as a plain ``nn.Module`` (no training logic).

``x [B, in_channels, H, W] in [-1, 1]`` --encoder--> moments ``[B, 2*z_channels, H/f, W/f]``
--quant_conv (1x1)--> ``[B, 2*embed_dim, H/f, W/f]`` = (mean, logvar) of the posterior q(z|x);
``z [B, embed_dim, H/f, W/f]`` --post_quant_conv (1x1)--> ``[B, z_channels, ...]`` --decoder--> ``[B, out_ch, H, W]``.
``f = 2 ** (len(ch_mult) - 1)``.

The constructor takes SD's ``first_stage_config.params`` as they are (``ddconfig``, ``embed_dim`` and the
training-side keys ``lossconfig``, ``ckpt_path``, ``ignore_keys``, ``image_key``, ``colorize_nlabels``,
``monitor``, ``ema_decay``, ``learn_logvar``). The loss is not part of this module: ``lossconfig`` is ignored
here and built by the training wrapper (``autoencoder.lightning.AutoencoderKLTraining``). The latent scale
factor is not part of the module either; it travels in the weights file (see ``autoencoder.io``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from autoencoder.distributions import DiagonalGaussianDistribution
from autoencoder.model import Decoder, Encoder
from ldm.util import to_container


def _plain(value: Any) -> Any:
    """Plain dicts/lists (JSON-able) from OmegaConf nodes, tuples or mappings."""
    value = to_container(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class AutoencoderKL(nn.Module):
    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        lossconfig: Mapping[str, Any] | None = None,
        ckpt_path: str | None = None,
        ignore_keys: Iterable[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        ema_decay: float | None = None,
        learn_logvar: bool = False,
    ):
        """
        Args:
            ddconfig: SD's encoder/decoder config (double_z, z_channels, resolution, in_channels, out_ch, ch,
                ch_mult, num_res_blocks, attn_resolutions, dropout; optionally resamp_with_conv, attn_type).
            embed_dim: latent channels after ``quant_conv``.
            lossconfig: accepted for SD config compatibility; ignored (the loss lives in the training wrapper).
            ckpt_path: weights to load right away (``.safetensors`` or a CompVis/SD ``.ckpt``; an SD
                ``first_stage_model.`` prefix is stripped); keys starting with an ``ignore_keys`` entry are dropped.
            image_key: batch key of the images (used by training code).
            colorize_nlabels: SD's random projection for segmentation inputs (registers a ``colorize`` buffer).
            monitor, ema_decay, learn_logvar: training options kept as attributes for the training wrapper.
        """
        super().__init__()
        ddconfig = _plain(ddconfig)
        if not isinstance(ddconfig, dict):
            raise ValueError(f"ddconfig must be a mapping, got {type(ddconfig).__name__}")
        missing = [k for k in ("z_channels", "ch", "num_res_blocks", "in_channels", "out_ch", "resolution")
                   if k not in ddconfig]
        if missing:
            raise ValueError(f"ddconfig is missing required key(s) {missing}")
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z = true (the encoder outputs mean and logvar)")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        self.ddconfig = ddconfig
        self.embed_dim = int(embed_dim)
        self.image_key = image_key
        self.monitor = monitor
        self.ema_decay = ema_decay
        self.learn_logvar = learn_logvar
        self.lossconfig = lossconfig

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, int(colorize_nlabels), 1, 1))

        if ckpt_path is not None:
            from autoencoder.io import load_weights_into

            load_weights_into(self, ckpt_path, ignore_keys=ignore_keys)

    @property
    def in_channels(self) -> int:
        return self.encoder.in_channels

    @property
    def downsampling_factor(self) -> int:
        """Spatial factor f between image and latent: ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (self.encoder.num_resolutions - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(embed_dim, height / f, width / f)`` for an image of that size (checked like ``encode``)."""
        self._check_spatial(height, width)
        f = self.downsampling_factor
        return (self.embed_dim, height // f, width // f)

    def _check_spatial(self, height: int, width: int) -> None:
        f = self.downsampling_factor
        if height % f != 0 or width % f != 0 or height < f or width < f:
            raise ValueError(
                f"image height and width must be positive multiples of {f} (2**(len(ch_mult)-1) for "
                f"ch_mult={list(self.ddconfig.get('ch_mult', []))}), got {height}x{width}"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """``x [B, in_channels, H, W]`` (H, W multiples of f) -> posterior over ``[B, embed_dim, H/f, W/f]``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"encode expects a 4-D tensor [B, C, H, W], got {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"encode expects {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        self._check_spatial(x.shape[2], x.shape[3])
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, embed_dim, h, w]`` (unscaled latents) -> image ``[B, out_ch, h*f, w*f]``."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != self.embed_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"decode expects latents [B, {self.embed_dim}, h, w], got {shape}")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``x`` through a posterior sample (or its mode); returns ``(reconstruction, posterior)``."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, where the GAN's adaptive weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def model_config(self) -> dict[str, Any]:
        """``{target, params}`` that rebuilds this module (stored in the weights' metadata)."""
        return {
            "target": "autoencoder.AutoencoderKL",
            "params": {"ddconfig": dict(self.ddconfig), "embed_dim": self.embed_dim},
        }
