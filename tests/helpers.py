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
                 signal_name: str = "SIGKILL", kill_rank: int | None = None):
        super().__init__(num_samples, size)
        self.kill_rank = kill_rank  # None: any process; else only the process of that rank
        self.kill_at = kill_at
        self.marker = marker
        self.signal_name = signal_name
        self.loaded = 0

    def __getitem__(self, index: int) -> dict:
        self.loaded += 1
        from ldm.distributed import launch_rank

        mine = self.kill_rank is None or launch_rank() == self.kill_rank
        if mine and self.kill_at is not None and self.loaded >= self.kill_at and not os.path.exists(self.marker):
            import signal

            open(self.marker, "w").close()
            os.kill(os.getpid(), getattr(signal, self.signal_name))
        return super().__getitem__(index)


class FixedNoiseImages(TinyCaptionedImages):
    """``TinyCaptionedImages`` whose items also carry their diffusion timestep ``t`` and noise ``[4, 8, 8]`` (the tiny
    f2 autoencoder's latent shape at 16 px), both fixed by the index: a sample trains the same whichever batch or
    process it lands in."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        generator = torch.Generator().manual_seed(1000 + index)
        item["noise"] = torch.randn(4, self.size // 2, self.size // 2, generator=generator)
        item["t"] = torch.tensor((37 * index + 11) % 100)
        item["index"] = index
        return item


def _fixed_noise_trainer():
    from ldm.diffusion import diffusion_loss
    from ldm.models.diffusion_trainer import DiffusionTrainer

    class FixedNoiseTrainer(DiffusionTrainer):
        """``DiffusionTrainer`` on posterior means with each sample's own ``t`` and noise (``FixedNoiseImages``): a step
        depends only on which samples it sees. After every optimizer step it writes this rank's UNet and EMA weights
        to ``<run>/ranks/rank<r>-step<n>.safetensors``."""

        def batch_loss(self, batch, training, generator=None):
            if not training:
                return super().batch_loss(batch, training, generator)
            latents = self.model.encode_images(batch["image"], sample=False)
            context = self.model.encode_text(list(batch["caption"]))
            loss = diffusion_loss(self.model.model_fn, self.model.schedule, latents, cond=context,
                                  parameterization=self.model.parameterization, noise=batch["noise"], t=batch["t"])
            return loss, len(latents)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            import json

            from safetensors.torch import save_file

            folder = os.path.join(self.trainer.default_root_dir, "ranks")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{self.trainer.global_rank}-indices.jsonl"), "a") as log:
                log.write(json.dumps([self.trainer.global_step, batch["index"].tolist()]) + "\n")
            step = self.trainer.global_step
            if step == getattr(self, "_dumped", 0):
                return
            self._dumped = step
            state = {k: v.detach().clone().contiguous() for k, v in self.state_dict().items()
                     if k.startswith(("model.model.", "model_ema."))}
            save_file(state, os.path.join(folder, f"rank{self.trainer.global_rank}-step{step}.safetensors"))

    return FixedNoiseTrainer


def __getattr__(name):  # the trainer class is built on first use: importing DiffusionTrainer is not free
    if name == "FixedNoiseTrainer":
        cls = _fixed_noise_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
