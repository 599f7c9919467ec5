"""Datasets shared by the autoencoder and diffusion stages: items are ``{"image": [3, H, W] in [-1, 1], "caption": str}``."""

from ldm.data.image_folder import CaptionedImageFolder
from ldm.data.shapes import ShapesDataset, ShapeSpec

__all__ = ["CaptionedImageFolder", "ShapesDataset", "ShapeSpec"]
