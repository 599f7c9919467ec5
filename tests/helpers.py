"""Small models and data the tests build themselves (nothing is downloaded)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

TINY_DIFFUSION_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "tiny-diffusion.yaml")

TINY_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


class TinyCaptionedImages(Dataset):
    """Deterministic coloured squares with captions: ``{"image": [3,size,size] in [-1,1], "caption": str}``."""

    COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}

    def __init__(self, num_samples: int = 16, size: int = 16):
        self.num_samples = num_samples
        self.size = size

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        name = list(self.COLOURS)[index % len(self.COLOURS)]
        image = -torch.ones(3, self.size, self.size)
        quarter = self.size // 4
        image[:, quarter : 3 * quarter, quarter : 3 * quarter] = torch.tensor(self.COLOURS[name]).view(3, 1, 1)
        return {"image": image, "caption": f"a {name} square"}


def make_tiny_autoencoder_file(path, scale_factor: float | None = 1.0) -> str:
    """A random tiny f2 ``AutoencoderKL`` written with ``save_autoencoder`` (what stage one produces)."""
    from autoencoder import AutoencoderKL, save_autoencoder

    torch.manual_seed(0)
    model = AutoencoderKL(ddconfig=dict(TINY_DDCONFIG), embed_dim=4)
    save_autoencoder(path, model, scale_factor=scale_factor)
    return str(path)


class KillSwitchImages(TinyCaptionedImages):
    """``TinyCaptionedImages`` that sends ``signal_name`` (default SIGKILL) to its own process at the ``kill_at``-th
    item it loads, unless ``marker`` exists (it creates it first): a kill or a preemption at a fixed point of
    training, once, whatever the timing."""

    def __init__(self, num_samples: int = 16, size: int = 16, kill_at: int | None = None, marker: str | None = None,
                 signal_name: str = "SIGKILL"):
        super().__init__(num_samples, size)
        self.kill_at = kill_at
        self.marker = marker
        self.signal_name = signal_name
        self.loaded = 0

    def __getitem__(self, index: int) -> dict:
        self.loaded += 1
        if self.kill_at is not None and self.loaded >= self.kill_at and not os.path.exists(self.marker):
            import signal

            open(self.marker, "w").close()
            os.kill(os.getpid(), getattr(signal, self.signal_name))
        return super().__getitem__(index)
