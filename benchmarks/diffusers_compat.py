"""Our UNet / VAE weights as diffusers models, converted by diffusers' own LDM-checkpoint functions.

The converters live in :mod:`ldm.interop.diffusers` (which also writes whole diffusers folders); they are
re-exported here under the names the benchmarks and their tests use. Our state dicts use Stable Diffusion's key
layout, so diffusers' converters for original SD checkpoints apply unchanged (``create_unet_diffusers_config*``,
``convert_ldm_unet_checkpoint``, ``create_vae_diffusers_config*``, ``convert_ldm_vae_checkpoint``), from
``diffusers.loaders.single_file_utils`` (0.26 and later) or the older
``diffusers.pipelines.stable_diffusion.convert_from_ckpt`` (see :func:`converters`).

What diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` cannot express is a ``ValueError``, not a silently
different model: per-level ``num_res_blocks``, ``resblock_updown``, scale-shift norm, class conditioning,
``AttentionBlock`` instead of spatial transformers; VAE attention outside the mid block, ``embed_dim != z_channels``.

Benchmark-only helpers stay here: :func:`perturb_parameters`, :func:`max_abs_diff`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ldm.interop.diffusers import (  # noqa: F401  (re-exported)
    DIFFUSERS_BETA_SCHEDULES,
    PREDICTION_TYPES,
    UNET_PREFIX,
    VAE_PREFIX,
    Converters,
    _build,
    _original_config,
    _strict_load,
    check_unet_params,
    check_vae_config,
    convert_unet_state_dict,
    convert_vae_state_dict,
    converters,
    diffusers_ddim_scheduler,
    diffusers_unet_config,
    diffusers_vae_config,
    full_unet_params,
    to_diffusers_unet,
    to_diffusers_vae,
    unet_heads_per_level,
)


# ---------------------------------------------------------------------------------------------------- weights


@torch.no_grad()
def perturb_parameters(module: nn.Module, generator: Optional[torch.Generator] = None, scale: float = 0.5,
                       vector_std: float = 0.02) -> nn.Module:
    """Add Gaussian noise to every parameter in place, so that zero-initialised layers become non-trivial.

    Weights (ndim >= 2) get ``N(0, (scale / sqrt(fan_in))^2)`` (keeps activations O(1) whatever the width);
    biases and norm scales get ``N(0, vector_std^2)``. Returns ``module``.
    """
    for p in module.parameters():
        if p.ndim >= 2:
            std = scale / max(1, p[0].numel()) ** 0.5
        else:
            std = vector_std
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32, device="cpu")
        p.add_(noise.to(device=p.device, dtype=p.dtype), alpha=std)
    return module


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float64 (shapes must match)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.detach().double() - b.detach().double()).abs().max())
