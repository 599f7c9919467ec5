"""Training loss of the KL autoencoder: LPIPS-augmented L1 as a Gaussian NLL, KL to N(0, I), optional PatchGAN.

Generator (encoder + decoder) loss, as in SD's ``LPIPSWithDiscriminator`` (LDM paper, appendix G)::

    rec      = pixel_weight * |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)        per pixel, [B, C, H, W]
               (pixel_loss="l2" uses (x - x_rec)^2 instead of |x - x_rec|)
    nll      = sum(rec / exp(logvar) + logvar) / B                                      logvar: learned scalar
    kl       = sum_b KL(q(z|x_b) || N(0, I)) / B                                        closed form, summed over z
    g_loss   = -mean(D(x_rec))
    lambda   = disc_weight * clamp(||grad_L nll|| / (||grad_L g_loss|| + 1e-4), 0, 1e4)   L = decoder.conv_out.weight
    loss     = nll + kl_weight * kl + lambda * disc_factor(step) * g_loss

``pixel_loss="l1"`` is SD's choice. ``"l2"`` turns the NLL into a literal Gaussian one; it optimizes what PSNR
measures and, on flat-coloured synthetic images, converges several times faster (the shapes config uses it).

Discriminator loss: ``disc_factor(step) * hinge(D(x), D(x_rec))`` (or the non-saturating "vanilla" BCE).
``disc_factor(step)`` is 0 before ``disc_start`` steps, then ``disc_factor``.

Recipe (CompVis ``autoencoder_kl_32x32x4`` = SD's kl-f8 VAE): ``kl_weight=1e-6``, ``disc_start=50001``,
``disc_weight=0.5``, LPIPS (VGG, pretrained) with ``perceptual_weight=1``, Adam(lr 4.5e-6 per sample of batch,
betas (0.5, 0.9)) for both the autoencoder and the discriminator.

LPIPS backbone: ``perceptual_backbone="pretrained"`` needs torchvision's ImageNet weights in the torch hub cache
(e.g. ``~/.cache/torch/hub/checkpoints/vgg16-397923af.pth``); they are looked for before anything is built so an
offline machine fails at once with instructions instead of hanging on a download. ``"random"`` uses a randomly
initialised backbone (with the linear heads shipped inside the ``lpips`` package): no download, for tests only,
as a loss it is not meaningful. ``perceptual_weight=0`` builds no LPIPS at all.
"""

from __future__ import annotations

import os
import socket
import threading
import warnings
from typing import Any

import torch
from torch import nn

from autoencoder.discriminator import DISC_LOSSES, NLayerDiscriminator
from autoencoder.distributions import DiagonalGaussianDistribution

PERCEPTUAL_BACKBONES = ("pretrained", "random")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TORCH_HUB_OFFLINE", "LDM_OFFLINE", "NO_NETWORK")


class PerceptualWeightsUnavailable(RuntimeError):
    """Pretrained LPIPS backbone weights are not in the torch hub cache and cannot be downloaded."""


# --------------------------------------------------------------------------------------------- pure functions


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before ``threshold`` steps, ``weight`` from then on (switches the GAN term on at ``disc_start``)."""
    return value if global_step < threshold else weight


def gaussian_nll(rec_loss: torch.Tensor, logvar: torch.Tensor, weights: torch.Tensor | None = None):
    """Per-pixel reconstruction error as a Laplace/Gaussian-style NLL with one learned scale.

    ``rec_loss [B, ...]``, ``logvar []``. Returns ``(nll, weighted_nll)``, each ``sum(rec / exp(logvar) + logvar) / B``
    (``weighted_nll`` multiplies by ``weights`` before summing).
    """
    nll = rec_loss / torch.exp(logvar) + logvar
    weighted = nll if weights is None else weights * nll
    batch = rec_loss.shape[0]
    return torch.sum(nll) / batch, torch.sum(weighted) / batch


def adaptive_gan_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float = 1.0
) -> torch.Tensor:
    """``disc_weight * clamp(||d nll / d W|| / (||d g_loss / d W|| + 1e-4), 0, 1e4)``, detached; ``W = last_layer``.

    Balances the GAN gradient against the reconstruction gradient at the decoder's last layer (taming/VQGAN).
    The graph is kept (``retain_graph``) for the backward pass that follows.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


# --------------------------------------------------------------------------------------------- LPIPS


def _backbone_url(net: str) -> str:
    from torchvision import models

    weights = {
        "vgg": models.VGG16_Weights.IMAGENET1K_V1,
        "alex": models.AlexNet_Weights.IMAGENET1K_V1,
        "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }
    if net not in weights:
        raise ValueError(f"perceptual_net must be one of {sorted(weights)}, got {net!r}")
    return weights[net].url


def backbone_cache_path(net: str = "vgg") -> str:
    """Where torchvision looks for the ImageNet backbone LPIPS needs, e.g. ``~/.cache/torch/hub/checkpoints/vgg16-397923af.pth``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(_backbone_url(net)))


def pretrained_backbone_available(net: str = "vgg") -> bool:
    return os.path.isfile(backbone_cache_path(net))


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in _OFFLINE_ENV)


def _can_reach(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the URL's host opens within ``timeout`` s (DNS included)."""
    from urllib.parse import urlparse

    host = urlparse(url).hostname
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result["ok"]


def check_pretrained_backbone(net: str = "vgg", allow_download: bool | None = None) -> None:
    """Raise ``PerceptualWeightsUnavailable`` (with how to fix it) unless the backbone can be loaded without hanging.

    ``allow_download=None`` allows a download unless an offline variable (``HF_HUB_OFFLINE``, ``TORCH_HUB_OFFLINE``,
    ``LDM_OFFLINE``) is set; the host is probed with a short timeout first.
    """
    if pretrained_backbone_available(net):
        return
    url = _backbone_url(net)
    if allow_download is None:
        allow_download = not _offline()
    if allow_download and _can_reach(url):
        return
    path = backbone_cache_path(net)
    raise PerceptualWeightsUnavailable(
        f"LPIPS needs torchvision's pretrained {net} weights, which are not in the torch hub cache and cannot be "
        f"downloaded here ({'offline mode is set' if not allow_download else 'no network'}). Either put the file "
        f"{os.path.basename(path)} (from {url}) at {path} (set TORCH_HOME to move the cache), or switch the "
        f"perceptual loss off with lossconfig.params.perceptual_weight=0 "
        f"(or perceptual_backbone=random, which is only meaningful for tests)."
    )


class PerceptualLoss(nn.Module):
    """Frozen LPIPS distance ``[B, 3, H, W] x2 in [-1, 1] -> [B, 1, 1, 1]``; stays in eval mode (no dropout)."""

    def __init__(self, backbone: str = "pretrained", net: str = "vgg", allow_download: bool | None = None):
        super().__init__()
        if backbone not in PERCEPTUAL_BACKBONES:
            raise ValueError(f"perceptual_backbone must be one of {PERCEPTUAL_BACKBONES}, got {backbone!r}")
        _backbone_url(net)  # validates the name
        if backbone == "pretrained":
            check_pretrained_backbone(net, allow_download)
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for `pretrained=`
            # pretrained=True loads the linear heads shipped in the lpips package; pnet_rand picks the backbone
            self.lpips = lpips.LPIPS(pretrained=True, net=net, pnet_rand=(backbone == "random"), verbose=False)
        self.backbone = backbone
        self.lpips.eval()
        for param in self.lpips.parameters():
            param.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.lpips.eval()  # the lpips heads contain dropout; the metric must be deterministic
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y)


# --------------------------------------------------------------------------------------------- the loss module


class LPIPSWithDiscriminator(nn.Module):
    """SD's autoencoder loss (see the module docstring for the equations and the recipe).

    ``forward(inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer, cond, split, weights)``
    keeps SD's signature: ``optimizer_idx=0`` gives the generator loss, ``1`` the discriminator loss
    (``generator_loss`` / ``discriminator_loss`` are the same by name). Returns ``(loss, log_dict)``.
    """

    def __init__(
        self,
        disc_start: int = 50001,
        logvar_init: float = 0.0,
        kl_weight: float = 1e-6,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        disc_ndf: int = 64,
        use_discriminator: bool = True,
        perceptual_backbone: str = "pretrained",
        perceptual_net: str = "vgg",
        pixel_loss: str = "l1",
    ):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISC_LOSSES)}, got {disc_loss!r}")
        if perceptual_weight < 0 or kl_weight < 0 or pixelloss_weight < 0:
            raise ValueError("perceptual_weight, kl_weight and pixelloss_weight must be >= 0")
        if disc_conditional:
            raise ValueError("disc_conditional=True is not supported")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        self.pixel_loss = pixel_loss
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = (
            PerceptualLoss(perceptual_backbone, perceptual_net) if perceptual_weight > 0 else None
        )
        self.logvar = nn.Parameter(torch.ones(()) * logvar_init)
        self.use_discriminator = use_discriminator
        self.discriminator = (
            NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm) if use_discriminator else None
        )
        self.discriminator_iter_start = disc_start
        self.disc_loss_name = disc_loss
        self.disc_loss = DISC_LOSSES[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms count at this step (a discriminator exists, its factor is on)."""
        return self.discriminator is not None and adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start) > 0

    def reconstruction_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-pixel ``pixel_weight * |x - x_rec| (or squared) + perceptual_weight * LPIPS(x, x_rec)``, ``[B, C, H, W]``."""
        # at least float32, so that the per-pixel error and its sums stay accurate under bf16 autocast
        dtype = torch.promote_types(torch.promote_types(inputs.dtype, reconstructions.dtype), torch.float32)
        diff = inputs.contiguous().to(dtype) - reconstructions.contiguous().to(dtype)
        rec = diff.abs() if self.pixel_loss == "l1" else diff.pow(2)
        if self.pixel_weight != 1.0:
            rec = self.pixel_weight * rec
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec = rec + self.perceptual_weight * p_loss
        return rec

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: DiagonalGaussianDistribution,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        split: str = "train",
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec_loss = self.reconstruction_loss(inputs, reconstructions)
        nll_loss, weighted_nll_loss = gaussian_nll(rec_loss, self.logvar, weights)
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        loss = weighted_nll_loss + self.kl_weight * kl_loss

        zero = torch.zeros((), device=inputs.device)
        g_loss, d_weight, disc_factor = zero, zero, 0.0
        if self.discriminator_active(global_step):
            disc_factor = adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start)
            g_loss = -torch.mean(self.discriminator(reconstructions.contiguous()))
            can_differentiate = (
                last_layer is not None and torch.is_grad_enabled() and last_layer.requires_grad
                and reconstructions.requires_grad
            )
            if can_differentiate:  # not in validation, where no graph exists
                d_weight = adaptive_gan_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)
            loss = loss + d_weight * disc_factor * g_loss

        log = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor)),
            f"{split}/g_loss": g_loss.detach(),
        }
        return loss, log

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int, split: str = "train"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.discriminator is None:
            raise ValueError("this loss has no discriminator (use_discriminator=False)")
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        disc_factor = adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {
            f"{split}/disc_loss": d_loss.detach(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: DiagonalGaussianDistribution,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: Any = None,
        split: str = "train",
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if cond is not None:
            raise ValueError("conditional discriminators are not supported (cond must be None)")
        if optimizer_idx == 0:
            return self.generator_loss(inputs, reconstructions, posteriors, global_step, last_layer, split, weights)
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, reconstructions, global_step, split)
        raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")
