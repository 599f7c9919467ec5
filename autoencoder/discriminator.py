"""PatchGAN discriminator (pix2pix's ``NLayerDiscriminator``) and the GAN losses of taming-transformers / SD.

``NLayerDiscriminator: [B, input_nc, H, W] -> logits [B, 1, H', W']``, one logit per overlapping patch
(70x70 receptive field for ``n_layers=3``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weights_init(module: nn.Module) -> None:
    """DCGAN init used by taming: conv weights ~ N(0, 0.02), batch-norm scale ~ N(1, 0.02), shift 0."""
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs, stride 2 for the first ``n_layers`` (channels ndf * min(2**n, 8)), BatchNorm, LeakyReLU(0.2).

    Parameter names (``main.{i}``) match taming's, so SD-style discriminator weights load unchanged.
    ``use_actnorm`` (taming's data-dependent ActNorm) is not supported.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        if use_actnorm:
            raise ValueError("use_actnorm=True is not supported; the discriminator uses BatchNorm")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        kw, padw = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=False),
                nn.BatchNorm2d(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=False),
            nn.BatchNorm2d(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))``."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating BCE: ``0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec))))``."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
