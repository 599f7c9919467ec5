"""The denoising UNet (``openaimodel.UNetModel``) and its building blocks (``util``)."""

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding

__all__ = ["UNetModel", "timestep_embedding"]
