"""Editing on the shapes benchmark: does img2img change one attribute in place, does inpainting replace one object?

Inputs are drawn by the dataset's renderer (``ldm.data.shapes.render``) from seeded random scenes over the training
colour/shape pairs; outputs are read back by :func:`ldm.eval.shapes_eval.score_prompt`:

* ``img2img``: one object; the prompt changes its colour or its shape and keeps its size and position. Right when the
  output shows exactly the prompt's object (colour, shape, size, position and count).
* ``inpaint``: two objects in two corners; the mask is the quadrant of one of them, the prompt names a new object
  there (another colour and shape) beside the kept one. Right when the output shows both; the kept region's PSNR
  (outside the mask, [-1, 1] pixels, peak-to-peak 2) is reported per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ldm.data.shapes import CORNERS, COLOURS, SHAPES, SIZES, TRAIN_PAIRS, ShapeSpec, image_to_tensor, object_phrase, render
from ldm.eval.shapes_eval import score_prompt

TASKS = ("img2img", "inpaint")


@dataclass
class EditCase:
    prompt: str
    image: torch.Tensor  # [3, 64, 64] in [-1, 1]
    mask: torch.Tensor | None  # [1, 64, 64], 1 = repaint
    target: list[ShapeSpec]


def quadrant_mask(corner: str, size: int = 64) -> torch.Tensor:
    """``[1, size, size]``: 1 on the quadrant of ``corner`` (``"top left"`` ...)."""
    mask = torch.zeros(1, size, size)
    rows = slice(0, size // 2) if corner.startswith("top") else slice(size // 2, size)
    cols = slice(0, size // 2) if corner.endswith("left") else slice(size // 2, size)
    mask[:, rows, cols] = 1
    return mask


def img2img_cases(count: int, seed: int = 0) -> list[EditCase]:
    rng = np.random.default_rng(seed)
    cases = []
    for k in range(count):
        colour, shape = TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))]
        spec = ShapeSpec(shape, colour, str(rng.choice(tuple(SIZES))), str(rng.choice(CORNERS + ("center",))))
        if k % 2 == 0:  # change the colour
            new = [c for c in COLOURS if c != colour and (c, shape) in TRAIN_PAIRS]
            target = spec._replace(colour=str(rng.choice(new)))
        else:  # change the shape
            new = [s for s in SHAPES if s != shape and (colour, s) in TRAIN_PAIRS]
            target = spec._replace(shape=str(rng.choice(new)))
        cases.append(EditCase(object_phrase(target), image_to_tensor(render([spec])), None, [target]))
    return cases


def inpaint_cases(count: int, seed: int = 0) -> list[EditCase]:
    rng = np.random.default_rng(seed + 1)
    cases = []
    for _ in range(count):
        first, second = (str(c) for c in rng.choice(CORNERS, size=2, replace=False))
        pairs = [TRAIN_PAIRS[i] for i in rng.choice(len(TRAIN_PAIRS), size=3, replace=False)]
        replaced = ShapeSpec(pairs[0][1], pairs[0][0], "small", first)
        kept = ShapeSpec(pairs[1][1], pairs[1][0], "small", second)
        new = ShapeSpec(pairs[2][1], pairs[2][0], "small", first)
        prompt = f"{object_phrase(new, with_size=False)} and {object_phrase(kept, with_size=False)}"
        # the prompt names no size, so none is scored (the kept object is pasted back as it was)
        target = [new._replace(size=None), kept._replace(size=None)]
        cases.append(EditCase(prompt, image_to_tensor(render([replaced, kept])), quadrant_mask(first), target))
    return cases


def psnr_outside(output: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR in dB of ``output`` against ``image`` where ``mask`` is 0 (pixels in [-1, 1]: peak-to-peak 2)."""
    keep = (mask == 0).expand_as(image)
    mse = float(((output - image) ** 2)[keep].mean())
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def score_cases(cases: Sequence[EditCase], outputs: torch.Tensor) -> dict[str, Any]:
    """Accuracy (and, for inpainting, the kept region's PSNR) of ``outputs [N, 3, H, W]`` for ``cases``."""
    items = []
    for case, output in zip(cases, outputs):
        score = score_prompt(case.target, output)
        item = {"prompt": case.prompt, "correct": bool(score["correct"]), "position_ok": bool(score["position_ok"])}
        if case.mask is not None:
            item["psnr_kept"] = psnr_outside(output, case.image, case.mask)
        items.append(item)
    result = {"count": len(items), "accuracy": float(np.mean([i["correct"] for i in items])),
              "position_kept": float(np.mean([i["position_ok"] for i in items])), "items": items}
    if any("psnr_kept" in i for i in items):
        psnrs = np.array([i["psnr_kept"] for i in items])
        result["psnr_kept_median"] = float(np.median(psnrs))
        result["psnr_kept_at_least_30db"] = float(np.mean(psnrs >= 30))
    return result
