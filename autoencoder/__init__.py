"""KL-regularised autoencoder (Stable Diffusion's first stage): model, loss, training wrapper, weights I/O."""

from autoencoder.autoencoder_kl import AutoencoderKL
from autoencoder.distributions import DiagonalGaussianDistribution
from autoencoder.io import (
    extract_first_stage_state_dict,
    load_autoencoder,
    read_scale_factor,
    save_autoencoder,
    write_scale_factor,
)
from autoencoder.model import Decoder, Encoder

__all__ = [
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussianDistribution",
    "Encoder",
    "extract_first_stage_state_dict",
    "load_autoencoder",
    "read_scale_factor",
    "save_autoencoder",
    "write_scale_factor",
]
