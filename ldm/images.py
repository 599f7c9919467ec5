"""Image tensors to files: PNG with text metadata, and grids."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torchvision.utils import make_grid


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3,H,W]`` in [-1, 1] -> ``[H,W,3]`` uint8 (values outside [-1, 1] are clamped)."""
    image = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return image.permute(1, 2, 0).numpy()


def save_png_with_metadata(image: torch.Tensor, path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``[3,H,W]`` in [-1, 1] as PNG with ``metadata`` as tEXt chunks (readable with ``Image.open(p).text``)."""
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path, pnginfo=info)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, metadata: Mapping[str, str] | None = None) -> None:
    """Write a grid of ``[N,3,H,W]`` images in [-1, 1] as one PNG."""
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2, pad_value=-1.0)
    save_png_with_metadata(grid, path, metadata)
