"""Conditioners: text prompts -> cross-attention context (``FrozenOpenCLIPEmbedder`` for SD 2, ``FrozenCLIPEmbedder``
for SD 1's OpenAI CLIP in Hugging Face's key layout)."""

from ldm.modules.encoders.modules import AbstractEncoder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

__all__ = ["AbstractEncoder", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"]
