"""Inference speed settings for a :class:`~ldm.models.latent_diffusion.LatentDiffusion` model.

Each setting keeps the output equal to the plain float32 path within a stated tolerance (tested in
``tests/test_inference_speed.py``; measured in ``benchmarks/run.py``):

* ``channels_last``: UNet and VAE weights and activations in NHWC, the layout oneDNN's CPU convolutions and
  cuDNN's tensor-core kernels prefer. Same arithmetic, another summation order: max relative difference ~1e-6.
* ``compile``: ``nn.Module.compile()`` (TorchInductor; on the CPU it writes C++/OpenMP kernels, which needs a C++
  compiler) on the UNet and the VAE decoder. Fuses GroupNorm + SiLU and the elementwise tails; the first call of
  each new input shape compiles (tens of seconds on 2 cores). Max relative difference ~1e-5. Module names and
  state-dict keys do not change.
* precision (``ldm.generate.autocast_for``): bf16 autocast of the UNet, where the CPU has native bf16 (AVX-512
  BF16 / AMX) or on CUDA; ~1e-2 relative difference per step, not bit-comparable with float32.
"""

from __future__ import annotations

import logging
import shutil

import torch

log = logging.getLogger(__name__)


def compiler_available() -> bool:
    """TorchInductor's CPU backend compiles C++: it needs a C++ compiler on the PATH."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def prepare_for_inference(model, channels_last: bool = True, compile: bool = False):
    """Apply the speed settings to ``model`` in place (after moving it to its device) and return it.

    ``compile=True`` without a C++ compiler on a CPU model logs a warning and leaves the model uncompiled.
    """
    model.eval()
    if channels_last:
        model.unet.to(memory_format=torch.channels_last)
        model.first_stage_model.to(memory_format=torch.channels_last)
    if compile:
        if model.device.type == "cpu" and not compiler_available():
            log.warning("--compile: no C++ compiler found (TorchInductor needs one on the CPU); running uncompiled")
            return model
        model.unet.compile(dynamic=False)
        model.first_stage_model.decoder.compile(dynamic=False)
    return model
