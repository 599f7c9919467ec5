"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around ``model_fn``.

``out = out_u + s (out_c - out_u)``: ``s = 1`` is the conditional model, ``s = 0`` the unconditional one, ``s > 1``
extrapolates away from the unconditional prediction. Applied to the raw model output (eps, x0 or v alike, as
Stable Diffusion 1.x / 2.x do).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def cat_batch(first: Any, second: Any) -> Any:
    """Concatenate two conditionings along the batch dim: tensors, or dicts / lists / tuples of them (nested).

    Raises ``ValueError`` when the two do not have the same structure or the tensors do not concatenate.
    """
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        if first.shape[1:] != second.shape[1:]:
            raise ValueError(
                f"cond and uncond shapes do not concatenate along the batch: {tuple(first.shape)} vs "
                f"{tuple(second.shape)}"
            )
        return torch.cat([first, second], dim=0)
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        if set(first) != set(second):
            raise ValueError(f"cond and uncond have different keys: {sorted(first)} vs {sorted(second)}")
        return {key: cat_batch(first[key], second[key]) for key in first}
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        if len(first) != len(second):
            raise ValueError(f"cond and uncond lists differ in length: {len(first)} vs {len(second)}")
        return type(first)(cat_batch(a, b) for a, b in zip(first, second))
    raise ValueError(
        f"cannot batch cond of type {type(first).__name__} with uncond of type {type(second).__name__}"
    )


def classifier_free_guidance(model_fn: ModelFn, guidance_scale: Optional[float]) -> ModelFn:
    """Wrap ``model_fn(x, t, cond)`` into ``guided_fn(x, t, (cond, uncond))``.

    ``guided_fn`` makes ONE ``model_fn`` call on the batch of ``2B``: ``x`` and ``t`` repeated and
    ``[uncond; cond]`` concatenated along dim 0 (see :func:`cat_batch`), then returns
    ``out_u + s (out_c - out_u)`` ``[B, ...]``. It always batches, also at ``s = 1`` or ``s = 0`` (results equal the
    conditional / unconditional model up to rounding).

    ``guidance_scale=None`` means no guidance: ``model_fn`` itself is returned and ``cond`` is passed unchanged.
    """
    if guidance_scale is None:
        return model_fn
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a number or None, got {guidance_scale!r}")
    scale = float(guidance_scale)

    def guided_fn(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if not isinstance(cond, (tuple, list)) or len(cond) != 2:
            raise ValueError("a classifier-free-guided model_fn takes cond as a pair (cond, uncond)")
        c, uc = cond
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), cat_batch(uc, c))
        if not isinstance(out, torch.Tensor) or out.shape[0] != 2 * batch:
            raise ValueError(f"guided model_fn expected an output batch of {2 * batch}")
        out_u, out_c = out.chunk(2)
        return out_u + scale * (out_c - out_u)

    guided_fn.guidance_scale = scale
    guided_fn.model_fn = model_fn
    return guided_fn
