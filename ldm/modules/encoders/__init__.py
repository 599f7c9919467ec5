"""Conditioners: text prompts -> cross-attention context (``modules.FrozenOpenCLIPEmbedder``)."""

from ldm.modules.encoders.modules import AbstractEncoder, FrozenOpenCLIPEmbedder

__all__ = ["AbstractEncoder", "FrozenOpenCLIPEmbedder"]
