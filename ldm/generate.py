"""Batched text-to-image generation where each image depends only on its own seed (its own noise stream)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ldm.diffusion.gaussian import randn
from ldm.models.latent_diffusion import LatentDiffusion


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed: its starting noise and every noise a sampler draws for it
    come from it alone (A1111's per-image generators), so an image is the same alone and inside any batch, and on
    any device."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def seeded_noise(shape: Sequence[int], seeds: Sequence[int] | None = None,
                 generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """``[N, *shape]`` standard normal noise, row k drawn from generator k (or a CPU generator seeded ``seeds[k]``).

    Drawn on the CPU so the same seed gives the same image on any device.
    """
    generators = seeded_generators(seeds) if generators is None else generators
    return randn((len(generators), *shape), generators)


PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_for(device: torch.device | str, precision: str):
    """Autocast context for the UNet: ``fp32`` (none), ``bf16``, or ``fp16`` (CUDA only: on the CPU fp16 is
    unusably slow and often unsupported). A ``ValueError`` for anything else."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def generate(
    model: LatentDiffusion,
    prompts: Sequence[str],
    sampler: Any,
    seeds: Sequence[int],
    guidance_scale: float | None = 5.0,
    height: int = 64,
    width: int = 64,
    batch_size: int = 8,
    autocast: Any = None,
    progress: bool = True,
    decode_dtype: torch.dtype = torch.float32,
    init_images: torch.Tensor | None = None,
    strength: float = 1.0,
    masks: torch.Tensor | None = None,
    jumps: int = 0,
) -> torch.Tensor:
    """Sample one image per ``(prompt, seed)`` pair; returns ``[N,3,H,W]`` pixels in [-1, 1] on the CPU.

    With ``init_images`` (``[N,3,H,W]`` in [-1, 1], one per prompt) each is edited instead: img2img at
    ``strength`` (:meth:`LatentDiffusion.img2img`), or, with ``masks`` (``[N,1,H,W]``, 1 = repaint), inpainted
    (:meth:`LatentDiffusion.inpaint`; ``jumps``: RePaint's resampling). The UNet may run under ``autocast`` (bf16/fp16); latents are
    decoded in ``decode_dtype`` (float32 by default: fp16 VAE decoders overflow into black images).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if init_images is not None and len(init_images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(init_images)} init images")
    if masks is not None and (init_images is None or len(masks) != len(prompts)):
        raise ValueError("masks need init_images, one mask per prompt")
    latent_shape = model.latent_shape(height, width)
    outputs = []
    batches = range(0, len(prompts), batch_size)
    for first in tqdm(batches, desc="batches", disable=not progress or len(batches) == 1):
        chunk_prompts = list(prompts[first : first + batch_size])
        chunk_seeds = list(seeds[first : first + batch_size])
        generators = seeded_generators(chunk_seeds)
        if masks is not None:
            from ldm.inpainting import known_region_generators

            with autocast or nullcontext():
                pixels = model.inpaint(
                    init_images[first : first + batch_size], masks[first : first + batch_size], chunk_prompts,
                    sampler, guidance_scale=guidance_scale, generator=generators,
                    known_generators=known_region_generators(chunk_seeds), progress=progress, jumps=jumps,
                )
            outputs.append(pixels.float().clamp(-1, 1).cpu())
            continue
        with autocast or nullcontext():
            if init_images is None:
                x_T = seeded_noise(latent_shape, generators=generators)  # the samplers' noise continues each stream
                latents = model.sample(
                    chunk_prompts, sampler, guidance_scale=guidance_scale, x_T=x_T, generator=generators,
                    progress=progress, decode=False,
                )
            else:
                latents = model.img2img(
                    init_images[first : first + batch_size], chunk_prompts, sampler, strength,
                    guidance_scale=guidance_scale, generator=generators, progress=progress, decode=False,
                )
        pixels = model.decode_latents(latents.to(decode_dtype))
        outputs.append(pixels.float().clamp(-1, 1).cpu())
    return torch.cat(outputs)
