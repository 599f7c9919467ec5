"""Reconstruction metrics on images in [-1, 1]: PSNR, SSIM, LPIPS, each per image (``[B]``)."""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB: ``10 log10(data_range^2 / mean((x - y)^2))`` over ``[B, C, H, W]`` -> ``[B]``.

    Images in [-1, 1] have ``data_range=2`` (the same value as for [0, 1] images with range 1); both inputs are
    clamped to the range first. A perfect reconstruction is capped by an MSE floor of 1e-12.
    """
    lo = -data_range / 2
    x = x.double().clamp(lo, lo + data_range)
    y = y.double().clamp(lo, lo + data_range)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))).float()


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5; torchmetrics) of [-1, 1] images mapped to [0, 1] -> ``[B]``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x01 = ((x.float().clamp(-1, 1) + 1) / 2)
    y01 = ((y.float().clamp(-1, 1) + 1) / 2)
    return structural_similarity_index_measure(x01, y01, data_range=1.0, reduction="none")
