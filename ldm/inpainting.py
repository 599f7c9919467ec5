"""Inpainting on the one generation loop: repaint where the mask is 1, keep the rest.

Two paths, chosen by the model (``config["inpainting"]``):

* any text-to-image model: at every step the known region of the state is replaced by the original's latents
  forward-noised to that step's noise level, ``x_t <- m x_t + (1 - m) (sqrt(abar) z0 + sqrt(1 - abar) n)`` with
  fresh ``n`` (SD's and RePaint's replacement), ``m`` the mask on the latent grid, dilated by one latent pixel so
  the seam is repainted too;
* Stable Diffusion's inpainting checkpoints (a 9-channel UNet): the UNet sees
  ``cat([x_t, mask, E(image * (1 - mask))])`` (SD's and diffusers' order) and needs no replacement.

After decoding, the known pixels are pasted back through a slightly feathered mask (as SD's inpainting script does),
so the image outside the mask is the input, up to the feather's few pixels along the seam.

Masks: ``[B, 1, H, W]``, 1 (white) = repaint; :func:`prepare_mask` thresholds and resizes a user's mask.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ldm.diffusion.gaussian import randn_like

log = logging.getLogger(__name__)
FEATHER_PIXELS = 2


def prepare_mask(mask: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """A user's mask ``[B, 1, h, w]`` (or ``[1, h, w]``) with values in [0, 1] -> binary ``[B, 1, H, W]`` at the
    image's ``size``: resized (nearest, with a warning) when the sizes differ, thresholded at ``threshold`` (with a
    note) when it is not already 0/1."""
    if mask.ndim == 3:
        mask = mask[None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, 1, H, W] (one channel), got {tuple(mask.shape)}")
    mask = mask.float()
    if tuple(mask.shape[-2:]) != tuple(size):
        log.warning("mask is %dx%d, the image %dx%d: mask resized (nearest)", mask.shape[-1], mask.shape[-2],
                    size[1], size[0])
        mask = F.interpolate(mask, size=tuple(size), mode="nearest")
    if not bool(((mask == 0) | (mask == 1)).all()):
        log.info("mask is not binary: values >= %.2f repaint, the rest is kept", threshold)
    return (mask >= threshold).float()


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int], dilate: int = 1) -> torch.Tensor:
    """Pixel mask ``[B, 1, H, W]`` -> latent-grid mask ``[B, 1, h, w]``: a latent cell is repainted when any of its
    pixels is, then dilated by ``dilate`` cells (the seam is repainted, not frozen)."""
    factor_h, factor_w = mask.shape[-2] // latent_size[0], mask.shape[-1] // latent_size[1]
    cells = F.max_pool2d(mask, kernel_size=(factor_h, factor_w))
    if dilate:
        cells = F.max_pool2d(cells, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    return cells


def feathered(mask: torch.Tensor, pixels: int = FEATHER_PIXELS) -> torch.Tensor:
    """The paste-back weight of the new image: 1 on the mask, falling to 0 over ``pixels`` outside it (a box blur
    of the mask dilated by ``pixels``), exactly 0 farther out."""
    if pixels <= 0:
        return mask
    grown = F.max_pool2d(mask, kernel_size=2 * pixels + 1, stride=1, padding=pixels)
    soft = F.avg_pool2d(grown, kernel_size=2 * pixels + 1, stride=1, padding=pixels, count_include_pad=False)
    return torch.maximum(mask, soft * grown)


def known_region_guide(z0: torch.Tensor, mask: torch.Tensor, sampler: Any,
                       generators: Sequence[torch.Generator] | None) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """The ``guide`` for :meth:`Sampler.sample` that puts the forward-noised original back where ``mask`` is 0.

    ``z0 [B, C, h, w]`` scaled latents, ``mask [B, 1, h, w]`` on the latent grid (1 = repaint). The noise comes from
    ``generators`` (one per image; each image's own stream, apart from the sampler's) or the global generator.
    """
    def guide(index: int, x_t: torch.Tensor) -> torch.Tensor:
        abar = float(sampler.input_alpha_cumprod(index))
        known = abar ** 0.5 * z0 + (1 - abar) ** 0.5 * randn_like(z0, generators)
        return mask.to(x_t) * x_t + (1 - mask.to(x_t)) * known.to(x_t)

    return guide


def renoise(x: torch.Tensor, abar_from: float, abar_to: float,
            generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """The forward process from noise level ``abar_from`` back to the noisier ``abar_to`` (RePaint's jump):
    ``x' = sqrt(a) x + sqrt(1 - a) n`` with ``a = abar_to / abar_from``, so ``q(x' | x0)`` is the marginal at
    ``abar_to``. ``n`` from each image's generator (or the global one)."""
    ratio = abar_to / abar_from
    if not 0 < ratio <= 1:
        raise ValueError(f"renoise goes to a noisier level: abar_to {abar_to} must be <= abar_from {abar_from}")
    return ratio ** 0.5 * x + (1 - ratio) ** 0.5 * randn_like(x, generators)


def known_region_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """Each image's stream for the known region's noise: seeded from its seed, apart from the sampler's stream."""
    return [torch.Generator().manual_seed((int(s) * 1_000_003 + 17) % 2**63) for s in seeds]


def concat_conditioning(model_fn: Callable, extra: torch.Tensor) -> Callable:
    """``model_fn`` of a 9-channel inpainting UNet: ``x_t [N, 4, h, w]`` becomes ``cat([x_t, extra])`` (``extra``
    ``[B, 5, h, w]``: mask, masked-image latents), repeated when guidance doubles the batch."""
    def wrapped(x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        repeats = x_t.shape[0] // extra.shape[0]
        return model_fn(torch.cat([x_t, extra.to(x_t).repeat(repeats, 1, 1, 1)], dim=1), t, cond)

    return wrapped


def random_masks(batch: int, height: int, width: int, generator: torch.Generator | None = None,
                 whole_prob: float = 0.25) -> torch.Tensor:
    """Training masks ``[batch, 1, height, width]`` (1 = repaint), SD's inpainting recipe in miniature: the whole
    image with probability ``whole_prob``, else one to three boxes (a quarter to three quarters of a side) and,
    half the time, a stroke (a bar of random thickness across the image)."""
    def draw(high: int) -> int:
        return int(torch.randint(0, max(1, high), (), generator=generator))

    masks = torch.zeros(batch, 1, height, width)
    for mask in masks:
        if float(torch.rand((), generator=generator)) < whole_prob:
            mask.fill_(1)
            continue
        for _ in range(1 + draw(3)):
            box_h = height // 4 + draw(height // 2 + 1)
            box_w = width // 4 + draw(width // 2 + 1)
            top, left = draw(height - box_h + 1), draw(width - box_w + 1)
            mask[:, top:top + box_h, left:left + box_w] = 1
        if float(torch.rand((), generator=generator)) < 0.5:
            thickness = 2 + draw(max(1, height // 8))
            if float(torch.rand((), generator=generator)) < 0.5:
                start = draw(height - thickness + 1)
                mask[:, start:start + thickness, :] = 1
            else:
                start = draw(width - thickness + 1)
                mask[:, :, start:start + thickness] = 1
    return masks


def widen_input_conv(state_dict: dict, model: torch.nn.Module,
                     key: str = "model.diffusion_model.input_blocks.0.0.weight") -> dict:
    """Start an inpainting UNet (more input channels) from a text-to-image model's weights: the first conv's extra
    input channels are zero, so the widened model computes exactly the base model's function at the start."""
    own = model.state_dict()[key]
    stored = state_dict.get(key)
    if stored is None or stored.shape == own.shape:
        return state_dict
    if stored.shape[0] != own.shape[0] or stored.shape[2:] != own.shape[2:] or stored.shape[1] > own.shape[1]:
        raise ValueError(f"{key}: cannot widen {tuple(stored.shape)} to {tuple(own.shape)}")
    widened = torch.zeros(own.shape, dtype=stored.dtype)
    widened[:, : stored.shape[1]] = stored
    log.info("%s: %d input channels widened to %d (the new ones start at zero)", key, stored.shape[1], own.shape[1])
    return {**state_dict, key: widened}
